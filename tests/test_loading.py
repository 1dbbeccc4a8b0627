import json

import pytest
import torch

from paretoq.errors import ParetoqError
from paretoq.models import load_model


def test_demo_loads_in_float32_with_eager_experts():
    loaded = load_model("demo")
    assert loaded.model.config.model_type == "deepseek_v3"
    assert loaded.model.config._experts_implementation == "eager"
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.tokenizer is not None and loaded.tokenizer.eos_token_id is not None


def test_meta_load_lists_the_same_components_without_weights():
    real, meta = load_model("demo"), load_model("demo", weights=False)
    assert [c for c in meta.adapter.components] == [c for c in real.adapter.components]
    assert all(p.is_meta for p in meta.model.parameters())


def test_dtype_by_name():
    loaded = load_model("demo", dtype="bf16", weights=False)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ParetoqError, match="unknown dtype"):
        load_model("demo", dtype="int3")


def test_missing_directory_never_downloads(tmp_path):
    with pytest.raises(ParetoqError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(ParetoqError, match="never downloads"):
        load_model("Qwen/Qwen1.5-MoE-A2.7B")


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ParetoqError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ParetoqError, match="not valid JSON"):
        load_model(tmp_path)


def test_unsupported_and_quantized_models_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ParetoqError, match=r"model_type 'bert' .* not supported; supported: .*mixtral"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "quantization_config": {"quant_method": "mxfp4"}}))
    with pytest.raises(ParetoqError, match="already quantized"):
        load_model(tmp_path)


def test_saved_tiny_model_directory_loads(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    assert loaded.model.config.model_type == "qwen2_moe"
    assert len(loaded.adapter.moe_blocks) == 2
