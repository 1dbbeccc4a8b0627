import pytest
import torch

from paretoq.quant.gptq import gptq
from paretoq.quant.quantizer import BITS, QuantSettings, grid_params, quantize_codes, rtn


def _correlated(n=2048, d=128, seed=0, dtype=torch.float64):
    """Inputs with strongly correlated features (a low-rank mix plus noise), as real activations are."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, 16, generator=g, dtype=dtype)
    X = torch.randn(n, 16, generator=g, dtype=dtype) @ A.T + 0.1 * torch.randn(n, d, generator=g, dtype=dtype)
    return X * torch.linspace(0.2, 3.0, d, dtype=dtype)  # uneven channel scales


def textbook_gptq(W, H, bits, group_size, sym=False, damp=0.01):
    """GPTQ as the paper's Algorithm 1 states it: one column at a time, every remaining column
    updated at once, no blocks, no batching; group grids fixed at each group's first column."""
    W = W.clone().double()
    H = H.clone().double()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    C = W.shape[1]
    H += damp * torch.diag(H).mean() * torch.eye(C, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    cols = C if group_size == -1 else group_size
    Q = torch.zeros_like(W)
    for c in range(C):
        if c % cols == 0:
            scale, zero = grid_params(W[:, c : c + cols], bits, sym)
        q = quantize_codes(W[:, c], scale, zero, bits)
        Q[:, c] = q
        err = (W[:, c] - scale * (q - zero)) / Hinv[c, c]
        W[:, c:] -= err[:, None] * Hinv[c, c:][None, :]
    return Q


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, -1])
def test_matches_the_textbook_algorithm(bits, group_size):
    X = _correlated(d=96)
    W = torch.randn(24, 96, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    H = X.T @ X
    res = gptq(W, H, bits, QuantSettings(group_size=group_size, block_size=64))
    ref = textbook_gptq(W, H, bits, group_size)
    mismatches = (res.q.codes.double() != ref).float().mean().item()
    assert mismatches == 0.0


@pytest.mark.parametrize("bits", BITS)
def test_gptq_beats_rtn_and_8_bit_is_far_better_than_2(bits):
    X = _correlated(dtype=torch.float32)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    H = X.T @ X
    err = {}
    for name, q in (("gptq", gptq(W, H, bits).q), ("rtn", rtn(W, bits))):
        err[name] = torch.linalg.norm(X @ W.T - X @ q.dequantize().T).item()
    assert err["gptq"] < err["rtn"]
    if bits == 8:
        e2 = torch.linalg.norm(X @ W.T - X @ gptq(W, H, 2).q.dequantize().T).item()
        assert err["gptq"] < e2 / 30  # grid steps shrink 85x from 2 to 8 bits: errors follow


@pytest.mark.parametrize("act_order", [False, True])
def test_batched_equals_looped(act_order):
    E, X = 4, [_correlated(n=512, d=64, seed=s, dtype=torch.float32) for s in range(4)]
    H = torch.stack([x.T @ x for x in X])
    H[2, 5, :] = H[2, :, 5] = 0  # a dead input in one expert only
    W = torch.randn(E, 32, 64, generator=torch.Generator().manual_seed(3))
    s = QuantSettings(group_size=32, act_order=act_order)
    batched = gptq(W, H, 3, s)
    for e in range(E):
        single = gptq(W[e], H[e], 3, s)
        assert torch.equal(batched.q.codes[e], single.q.codes)
        torch.testing.assert_close(batched.q.scales[e], single.q.scales)
    assert (batched.q.codes[2, :, 5] == batched.q.zeros[2, :, 0].to(torch.uint8)).all()  # dead column -> 0


@pytest.mark.parametrize("bits", BITS)
def test_codes_in_range_and_exact_weights_round_trip(bits):
    """A weight built from codes on an asymmetric grid (both ends of the grid present in every group)
    comes back exactly. (GPTQ's symmetric grid, scale = 2 max|W| / maxq, cannot rebuild a grid it did
    not make, so exactness is a property of the default asymmetric grid.)"""
    g = torch.Generator().manual_seed(4)
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (8, 64), generator=g)
    codes[:, ::32] = 0
    codes[:, 1::32] = maxq
    zero = torch.randint(0, maxq + 1, (8, 2), generator=g).float()
    scale = torch.rand(8, 2, generator=g) + 0.1
    col = torch.arange(64) // 32
    W = (codes.float() - zero[:, col]) * scale[:, col]
    for q in (rtn(W, bits, 32), gptq(W, torch.eye(64) * 10, bits, QuantSettings(group_size=32)).q):
        assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= maxq
        assert torch.equal(q.codes.long(), codes)
        torch.testing.assert_close(q.dequantize(), W, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_grid_is_centred_and_within_half_a_step(bits):
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(7))
    q = rtn(W, bits, 32, sym=True)
    assert (q.zeros == 2 ** (bits - 1)).all() and int(q.codes.max()) <= 2**bits - 1
    step = q.scales[:, torch.arange(64) // 32]
    assert ((q.dequantize() - W).abs() <= step / 2 + 1e-6).all()


def test_act_order_keeps_groups_contiguous_and_helps():
    X = _correlated(dtype=torch.float32, seed=5)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(6))
    H = X.T @ X
    plain = gptq(W, H, 3, QuantSettings(group_size=32))
    ordered = gptq(W, H, 3, QuantSettings(group_size=32, act_order=True))
    assert ordered.q.scales.shape == (64, 4)  # stored order: one grid per contiguous group
    e = [torch.linalg.norm(X @ (W - q.q.dequantize()).T).item() for q in (plain, ordered)]
    assert e[1] < e[0] * 1.05  # act_order is no worse (usually better) on uneven channels


def test_cholesky_failure_retries_with_more_damping():
    H = torch.ones(16, 16) - torch.eye(16) * 0.999  # indefinite: 1% damping is not enough
    W = torch.randn(4, 16)
    res = gptq(W, H, 4, QuantSettings(group_size=-1))
    assert res.damp.item() > 0.01 and torch.isfinite(res.q.dequantize()).all()
