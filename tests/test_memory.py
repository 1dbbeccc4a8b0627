"""Memory grows with the layer, not the model: each stage streamed (`--max-memory 0`) over a 2-layer
and an 8-layer model of one layer shape, each run in its own process, and their peak resident
memory compared (the procedure of `studies/scale/ladder.py`, which prints the figures).

A stage that held the model, its Hessians, its quant cache or a copy of its weights would grow by
six layers between the two; a streamed one only by what does not scale with weights (per-layer
records and activations). That the measurement sees a held model is shown by the ladder's control
(`studies/scale/ladder.py`: the same probe with the model resident grows by 5.97 layers, figures in
docs/benchmarks.md); it is not asserted here, because a resident process's peak also depends on
the host's free memory and allocator (one CI-like run saw 1,254,490,112 bytes at both depths).
GPTQ uses the min-max grid: a fifth of the default's time, and memory does not depend on the grid.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "studies" / "scale"))

from ladder import layer_bytes, make_model, run_stage, stages  # noqa: E402

# About 52 MiB a layer in float32 (32 experts of 3 x 256 x 512): large enough that 1.5 layers
# stands far above the run-to-run noise of a process's peak (a few MiB).
SHAPE = dict(hidden=512, experts=32, expert_size=256, top_k=4, heads=4, kv_heads=2, head_dim=64)
DEPTHS = (2, 8)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    """Each stage's peak RSS per depth, stages in the order a user runs them, sharing one cache per depth."""
    root = tmp_path_factory.mktemp("memory")
    models = {n: make_model(root / f"layers{n}", n, **SHAPE) for n in DEPTHS}
    peaks = {}
    for stage in ("probe", "search", "quantize", "eval"):
        peaks[stage] = {n: run_stage(stage, models[n], root / f"work{n}", stages=stages("minmax"))["peak_rss_bytes"]
                        for n in DEPTHS}
    return layer_bytes(models[DEPTHS[0]]), peaks


@pytest.mark.parametrize("stage", ["probe", "search", "quantize", "eval"])
def test_peak_memory_grows_with_the_layer_not_the_model(ladder, stage):
    one, peaks = ladder
    growth = peaks[stage][8] - peaks[stage][2]
    assert growth < 1.5 * one, (f"{stage}: 8 layers peak {peaks[stage][8] / 2**20:.0f} MiB, 2 layers "
                                f"{peaks[stage][2] / 2**20:.0f} MiB; one layer is {one / 2**20:.0f} MiB")

