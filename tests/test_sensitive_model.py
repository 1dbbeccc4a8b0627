"""The sensitive benchmark model (studies/sensitive/make.py) computes the demo's function, with
outlier columns in its weights: the reparametrisation is exact, so only quantization error changes."""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "studies" / "sensitive"))

from make import make  # noqa: E402

from paretoq.models.loading import demo_dir  # noqa: E402


def _logits(d: Path, ids: torch.Tensor) -> torch.Tensor:
    m = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    with torch.no_grad():
        return m(ids).logits


def _column_spread(w: torch.Tensor) -> float:
    """Largest over median input-column norm."""
    norms = w.float().norm(dim=0)
    return float(norms.max() / norms.median())


def test_same_function_other_weights(tmp_path):
    out = make(tmp_path / "sensitive", sigma=1.15, seed=0)
    ids = torch.randint(0, 4096, (2, 64), generator=torch.Generator().manual_seed(0))
    ref, new = _logits(demo_dir(), ids), _logits(out, ids)
    assert (ref - new).abs().max() < 1e-3 * ref.abs().max()

    before = load_file(str(demo_dir() / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    key = "model.layers.2.mlp.experts.3.gate_proj.weight"
    # the scales put outlier input columns into every norm-fed weight, many times the demo's spread
    assert _column_spread(after[key]) > 3 * _column_spread(before[key])
    # a different seed draws different scales; sigma 0 is the demo itself
    other = load_file(str(make(tmp_path / "seed1", sigma=1.15, seed=1) / "model.safetensors"))
    assert not torch.equal(other[key], after[key])
    same = load_file(str(make(tmp_path / "zero", sigma=0.0) / "model.safetensors"))
    assert all(torch.equal(same[k], before[k].float()) for k in before)
