"""The kernels' packed layout: round trips, equality with the checkpoint packing, dequantization."""

import pytest
import torch

from paretoq.kernels.layout import dequantize, pack_codes, pack_weight, row_words, stack, unpack_codes
from paretoq.quant.pack import pack
from paretoq.quant.quantizer import rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("K", [32, 100, 160, 256])
def test_round_trip(bits, K):
    g = torch.Generator().manual_seed(bits * 1000 + K)
    codes = torch.randint(0, 2**bits, (3, 5, K), generator=g, dtype=torch.uint8)  # stacked experts
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32 and words.shape == (3, 5, row_words(K, bits))
    assert torch.equal(unpack_codes(words, bits, K), codes.int())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_whole_value_widths_are_the_checkpoint_bitstream(bits):
    codes = torch.randint(0, 2**bits, (7, 96), dtype=torch.uint8)
    assert torch.equal(pack_codes(codes, bits), pack(codes, bits))


def test_three_bits_are_two_planes_without_straddling():
    K = 64
    codes = torch.zeros(1, K, dtype=torch.uint8)
    codes[0, 10] = 7  # the value that straddles words 0 and 1 in the checkpoint's bitstream
    words = pack_codes(codes, 3)
    assert words.shape[1] == K // 16 + K // 32 == 3 * K // 32  # still 3 bits a value
    assert words[0, 0] == 3 << 20  # low plane: value 10 at shift 2 * 10, inside word 0
    assert words[0, K // 16] == 1 << 10  # high plane: value 10 at bit 10 of the plane's first word


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
def test_dequantize_matches_quantized_tensor(bits, group_size):
    W = torch.randn(2, 24, 128)
    q = rtn(W, bits, group_size)
    pw = pack_weight(q)  # fp16 scales and zeros, as in checkpoints
    q.scales, q.zeros = q.scales.half().float(), q.zeros.half().float()
    assert torch.allclose(dequantize(pw), q.dequantize(), atol=1e-6)
    assert torch.equal(dequantize(stack([pw, pw]))[1], dequantize(pw))
