"""Memory grows with the layer, not the model: each stage streamed over a 2-layer and an 8-layer model
of the same layer shape, in a subprocess, and their peak resident memory compared.

A stage that held the model (or its Hessians, quant cache or a copy of its weights) would grow by
six layers' worth between the two; a streamed one by what does not depend on the layer count (a few
per-layer activations and small per-layer records) only.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "studies" / "scale"))

from make_model import make_model  # noqa: E402

SHAPE = dict(hidden=512, experts=64, expert_size=256, top_k=8, heads=8, kv_heads=2, head_dim=64)
TOKENS = ["--calib-tokens", "512", "--eval-tokens", "256", "--seq-len", "64", "--dtype", "float32",
          "--max-memory", "0"]
STAGES = {
    "probe": lambda d, out: ["probe", "--model", d, "--out", str(out / "probe")],
    "search": lambda d, out: ["search", "--model", d, "--budget", "3", "--trials", "4", "--space", "layer-experts",
                              "--bits", "2,4", "--storage", f"sqlite:///{out / 'study.db'}", "--out",
                              str(out / "search")],
    "quantize": lambda d, out: ["quantize", "--model", d, "--uniform", "4", "--out", str(out / "q4")],
    "eval": lambda d, out: ["eval", "--model", d, "--uniform", "4", "--json"],
}


def _layer_bytes(path: Path) -> int:
    """One decoder layer's weights in the compute dtype (float32)."""
    from safetensors import safe_open

    index = json.loads((path / "model.safetensors.index.json").read_text())
    params = 0
    for name in {f for k, f in index["weight_map"].items() if k.startswith("model.layers.0.")}:
        with safe_open(str(path / name), framework="pt") as fh:
            for k in fh.keys():
                if k.startswith("model.layers.0."):
                    params += math.prod(fh.get_slice(k).get_shape())
    return params * 4


def _peak(args: list[str], cache: Path) -> int:
    env = {"PARETOQ_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, str(REPO / "studies" / "scale" / "peak.py"), "--", *args, *TOKENS],
                       capture_output=True, text=True, env=env, cwd=cache.parent, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stderr.strip().splitlines()[-1])["peak_rss_bytes"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    return {n: make_model(root / f"layers{n}", n, **SHAPE, dtype="bfloat16") for n in (2, 8)}


@pytest.mark.parametrize("stage", list(STAGES))
def test_peak_memory_grows_with_the_layer_not_the_model(models, stage, tmp_path):
    layer = _layer_bytes(models[2])
    peaks = {}
    for n, path in models.items():
        out = tmp_path / f"run{n}"
        out.mkdir()
        peaks[n] = _peak(STAGES[stage](str(path), out), tmp_path / f"cache{n}")
    grew = peaks[8] - peaks[2]
    assert grew < 1.5 * layer, (f"{stage}: 8 layers peak {peaks[8] / 2**20:.0f} MiB vs 2 layers "
                                f"{peaks[2] / 2**20:.0f} MiB; one layer is {layer / 2**20:.0f} MiB")
