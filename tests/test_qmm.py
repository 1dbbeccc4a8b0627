"""The dequantizing matmul kernel against its torch reference, and the reference against an oracle.

Without CUDA the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py); with CUDA the same tests
run on the GPU.
"""

import pytest
import torch
from conftest import DEVICE

from paretoq.kernels.layout import pack_weight
from paretoq.kernels.qmm import block_k_for, k_splits, qmm, qmm_reference
from paretoq.quant.quantizer import rtn

# (M, N, K, group_size): M = 1 (GEMV path), skinny, prefill-like; K not a multiple of the block
# (the CPU block is 64: 96 and 160), per-channel groups with K not a multiple of 32 (100).
SHAPES = [(1, 48, 96, 32), (1, 40, 160, 32), (4, 33, 128, 64), (16, 64, 192, 64), (40, 24, 256, 128),
          (1, 20, 100, -1), (3, 20, 100, -1)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def oracle(x, q, bias=None):
    """x @ W.T in float64 from the QuantizedTensor's own codes (fp16-rounded scales, as packed)."""
    q.scales, q.zeros = q.scales.half().float(), q.zeros.half().float()
    y = x.double() @ q.dequantize().double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_qmm_matches_reference(bits, shape):
    M, N, K, gs = shape
    g = torch.Generator().manual_seed(hash((bits, shape)) % 2**31)
    q = rtn(torch.randn(N, K, generator=g), bits, gs)
    x = torch.randn(M, K, generator=g).half()
    pw = pack_weight(q).to(DEVICE)
    y = qmm(x.to(DEVICE), pw).cpu()
    ref = qmm_reference(x, pack_weight(q))
    assert y.shape == (M, N) and y.dtype == torch.float16 and torch.isfinite(y).all()
    assert rel(y, ref) < 2e-3
    assert rel(ref, oracle(x, q)) < 2e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 16])
def test_qmm_activation_dtypes_and_bias(dtype, M):
    torch.manual_seed(M)
    q = rtn(torch.randn(64, 128), 4, 64)
    x, bias = torch.randn(M, 128).to(dtype), torch.randn(64)
    y = qmm(x.to(DEVICE), pack_weight(q).to(DEVICE), bias.to(DEVICE)).cpu()
    assert y.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert rel(y, qmm_reference(x, pack_weight(q), bias)) < tol
    assert rel(y, oracle(x, q, bias)) < tol


def test_qmm_detects_a_wrong_weight():
    """The comparison can fail: one flipped code moves the output beyond the tolerance."""
    torch.manual_seed(0)
    q = rtn(torch.randn(32, 64), 4, 32)
    x = torch.randn(1, 64).half()
    pw = pack_weight(q)
    good = qmm(x.to(DEVICE), pw.to(DEVICE)).cpu()
    pw.qweight[3, 2] ^= 0xF0F0
    assert rel(qmm(x.to(DEVICE), pw.to(DEVICE)).cpu(), good) > 2e-3


def test_block_k_stays_inside_a_group():
    assert block_k_for(128, 4096, 256) == 128
    assert block_k_for(32, 4096, 128) == 32
    assert block_k_for(96, 4096, 128) == 32
    assert block_k_for(100, 100, 64) == 64  # one group per row
    with pytest.raises(ValueError, match="multiple of 32"):
        block_k_for(48, 96, 64)


@pytest.mark.parametrize("M", [1, 16])
@pytest.mark.parametrize("splits", [2, 3, 64])
def test_split_k_adds_the_same_sum(M, splits):
    """K split over programs (an uneven split, and more splits than K tiles): the partial sums,
    added atomically in fp32, give the unsplit answer; the bias is added once."""
    torch.manual_seed(splits)
    q = rtn(torch.randn(40, 320), 4, 32)  # 10 K tiles of 32
    x, bias = torch.randn(M, 320).half(), torch.randn(40)
    pw = pack_weight(q)
    config = {"BLOCK_M": 1 if M == 1 else 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": splits}
    y = qmm(x.to(DEVICE), pw.to(DEVICE), bias.to(DEVICE), config=config).cpu()
    # 3 splits of 10 tiles: 4 + 4 + 2 tiles; 64 splits: one tile each
    assert k_splits(config, 32, 320) == {2: (2, 160), 3: (3, 128), 64: (10, 32)}[splits]
    assert y.dtype == torch.float16
    assert rel(y, qmm_reference(x, pw, bias)) < 2e-3
    assert rel(y, oracle(x, q, bias)) < 2e-3


def test_decode_splits_fill_the_gpu_without_splitting_below_four_tiles():
    from paretoq.kernels.configs import decode_splits

    assert decode_splits(4096, 14336, 16, 1, 132) == 4  # 256 row tiles: 1,024 programs
    assert decode_splits(14336, 4096, 16, 1, 132) == 1  # 896 row tiles already fill 132 SMs
    assert decode_splits(64, 1024, 16, 1, 132) == 2  # 4 row tiles, but never under 512 columns a split
    for n, k, m in ((4096, 14336, 2), (768, 2048, 8), (7168, 2048, 1)):
        s = decode_splits(n, k, 16, m, 132)
        assert s >= 1 and (s == 1 or k // s >= 512) and m * -(-n // 16) * s <= 8 * 132
