"""paretoq/models/files.py: weight files checked from their headers alone."""

import json
import shutil

import pytest

from paretoq.errors import ParetoqError
from paretoq.models.files import check_weight_files, safetensors_data_end


@pytest.fixture
def model(tmp_path, tiny_model_dir):
    path = tmp_path / "m"
    shutil.copytree(tiny_model_dir, path)
    return path


def test_a_whole_model_passes_and_its_header_gives_the_size(model):
    check_weight_files(model)
    f = model / "model.safetensors"
    assert safetensors_data_end(f) == f.stat().st_size


def test_config_only(model):
    (model / "model.safetensors").unlink()
    with pytest.raises(ParetoqError, match="no weight files"):
        check_weight_files(model)


@pytest.mark.parametrize("keep", [4, 100, -1000])
def test_truncated(model, keep):
    f = model / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep > 0 else data[:keep])
    with pytest.raises(ParetoqError, match="truncated") as exc:
        check_weight_files(model)
    assert "\n" not in str(exc.value)


def test_a_shard_index_naming_a_missing_file(model):
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ParetoqError, match="'model-00002-of-00002.safetensors', which is missing"):
        check_weight_files(model)
    (model / "model.safetensors.index.json").write_text("{cut")
    with pytest.raises(ParetoqError, match="not a valid shard index"):
        check_weight_files(model)
