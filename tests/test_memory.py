"""Memory grows with the layer, not the model: each stage streamed (`--max-memory 0`) over a 2-layer
and an 8-layer model of one layer shape, each run in its own process, and their peak resident
memory compared (the procedure of `studies/scale/ladder.py`, which prints the figures).

A stage that held the model, its Hessians, its quant cache or a copy of its weights would grow by
six layers between the two; a streamed one only by what does not scale with weights (per-layer
records and activations).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "studies" / "scale"))

from ladder import SHAPE, STAGES, layer_bytes, make_model, run_stage  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    return {n: make_model(root / f"layers{n}", n, **SHAPE) for n in (2, 8)}


@pytest.mark.parametrize("stage", list(STAGES))
def test_peak_memory_grows_with_the_layer_not_the_model(models, stage, tmp_path):
    one = layer_bytes(models[2])
    peaks = {n: run_stage(stage, path, tmp_path / f"run{n}")["peak_rss_bytes"] for n, path in models.items()}
    assert peaks[8] - peaks[2] < 1.5 * one, (f"{stage}: 8 layers peak {peaks[8] / 2**20:.0f} MiB, 2 layers "
                                             f"{peaks[2] / 2**20:.0f} MiB; one layer is {one / 2**20:.0f} MiB")
