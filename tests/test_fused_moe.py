"""The fused mixed-width MoE kernel against its torch reference, and the reference against a naive
per-token oracle built from the QuantizedTensors themselves."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

from paretoq.kernels.layout import pack_weight
from paretoq.kernels.moe import PackedExperts, fused_moe, fused_moe_reference, moe_align
from paretoq.quant.quantizer import rtn

E, H, I = 8, 64, 96
PROJS = ("gate_proj", "up_proj", "down_proj")
# Experts at 2, 3, 4 and 8 bits, and gate/up/down of one expert at different widths.
BITS = {(e, p): (2, 3, 4, 8)[(e + j) % 4] for e in range(E) for j, p in enumerate(PROJS)}
# Experts 4, 5 and 7 receive no token.
IDS = torch.tensor([[0, 1], [1, 2], [3, 1], [2, 0], [6, 3]])


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def layer(group_size=32, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, b = {}, {}
    for (e, p), bits in BITS.items():
        shape = (H, I) if p == "down_proj" else (I, H)
        q[(e, p)] = rtn(torch.randn(shape, generator=g) / 8, bits, group_size)
        q[(e, p)].scales, q[(e, p)].zeros = q[(e, p)].scales.half().float(), q[(e, p)].zeros.half().float()
        b[(e, p)] = torch.randn(shape[0], generator=g) / 4
    packed = PackedExperts.build({k: pack_weight(v) for k, v in q.items()}, E, b if bias else None)
    return q, (b if bias else None), packed


def oracle(x, ids, w, q, b):
    out = torch.zeros(x.shape[0], H, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            W = {p: q[(e, p)].dequantize().double() for p in PROJS}
            lin = lambda v, p: v @ W[p].T + (b[(e, p)].double() if b else 0)  # noqa: E731
            xt = x[t].double()
            out[t] += w[t, k].double() * lin(F.silu(lin(xt, "gate_proj")) * lin(xt, "up_proj"), "down_proj")
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("group_size", [32, 96])
def test_mixed_width_layer_matches_reference(dtype, tokens, group_size):
    q, b, packed = layer(group_size, bias=group_size == 96)
    assert sorted(packed.up) == sorted(packed.down) == [2, 3, 4, 8]  # four launches per stage
    x = torch.randn(tokens, H).to(dtype)
    ids, w = IDS[:tokens], torch.rand(tokens, 2)
    y = fused_moe(x.to(DEVICE), ids.to(DEVICE), w.to(DEVICE), packed.to(DEVICE)).cpu()
    ref = fused_moe_reference(x, ids, w, packed)
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert rel(y, ref) < tol
    assert rel(ref, oracle(x, ids, w, q, b)) < tol


def test_custom_gate_runs_between_the_stages():
    """Architectures with their own gate (GPT-OSS) run it in torch on the up stage's [gate | up] rows."""
    q, b, packed = layer(bias=True)
    gate = lambda h: torch.sigmoid(h[:, :I]) * (h[:, I:] + 1)  # noqa: E731
    x, w = torch.randn(5, H).half(), torch.rand(5, 2)
    y = fused_moe(x.to(DEVICE), IDS.to(DEVICE), w.to(DEVICE), packed.to(DEVICE), apply_gate=gate).cpu()
    ref = fused_moe_reference(x, IDS, w, packed, apply_gate=gate)
    assert rel(y, ref) < 3e-3
    assert rel(y, fused_moe_reference(x, IDS, w, packed)) > 1e-2  # and the gate made a difference


def test_a_wrong_routing_weight_is_caught():
    q, b, packed = layer()
    x, w = torch.randn(5, H).half(), torch.rand(5, 2)
    ref = fused_moe_reference(x, IDS, w, packed)
    w2 = w.clone()
    w2[2, 1] += 0.5
    assert rel(fused_moe(x.to(DEVICE), IDS.to(DEVICE), w2.to(DEVICE), packed.to(DEVICE)).cpu(), ref) > 1e-2


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_moe_align_sorts_and_pads_by_expert(block_m):
    ids = torch.randint(0, E, (37, 2), generator=torch.Generator().manual_seed(block_m))
    sorted_ids, block_expert = moe_align(ids, E, block_m)
    S = ids.numel()
    real = sorted_ids[sorted_ids < S]
    assert torch.equal(real.sort().values, torch.arange(S, dtype=torch.int32))  # each assignment once
    flat = ids.reshape(-1)
    for blk, e in enumerate(block_expert.tolist()):
        rows = sorted_ids[blk * block_m : (blk + 1) * block_m]
        rows = rows[rows < S].long()
        if e == E:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and (flat[rows] == e).all()  # one expert per block


@pytest.mark.parametrize("tokens", [1, 5])
def test_split_k_in_both_stages(tokens):
    """Both stages with K split over programs (the decode configuration): the same layer output,
    biases added once."""
    q, b, packed = layer(bias=True)
    x, ids, w = torch.randn(tokens, H).half(), IDS[:tokens], torch.rand(tokens, 2)
    split = {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 2}
    configs = {(stage, bits): split for stage in ("up", "down") for bits in (2, 3, 4, 8)}
    y = fused_moe(x.to(DEVICE), ids.to(DEVICE), w.to(DEVICE), packed.to(DEVICE), configs=configs).cpu()
    assert y.dtype == torch.float16
    assert rel(y, fused_moe_reference(x, ids, w, packed)) < 3e-3
