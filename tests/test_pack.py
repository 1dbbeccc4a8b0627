import pytest
import torch

from paretoq.quant.pack import pack, packed_words, unpack
from paretoq.quant.quantizer import BITS


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [32, 40, 256, 7])
def test_round_trip(bits, n):
    codes = torch.randint(0, 2**bits, (5, n), generator=torch.Generator().manual_seed(bits * n), dtype=torch.int64)
    packed = pack(codes.to(torch.uint8), bits)
    assert packed.dtype == torch.int32 and packed.shape == (5, packed_words(n, bits))
    assert torch.equal(unpack(packed, bits, n), codes.to(torch.uint8))


def _bitwise_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The layout read literally, one bit at a time (the module's first implementation)."""
    rows, n = codes.shape
    stream = ((codes.long()[..., None] >> torch.arange(bits)) & 1).reshape(rows, n * bits)
    words = packed_words(n, bits)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - n * bits)).reshape(rows, words, 32)
    w = (stream << torch.arange(32)).sum(-1)
    return (w - ((w >> 31) << 32)).to(torch.int32)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [768, 64, 100, 33, 1])
def test_pack_and_unpack_match_the_layout_read_bit_by_bit(bits, n):
    """Every path of unpack (whole values per word, 3-bit triples, the general pair of words) against
    the bitstream built one bit at a time, on rows that hit word boundaries everywhere."""
    codes = torch.randint(0, 2**bits, (9, n), generator=torch.Generator().manual_seed(n + bits), dtype=torch.uint8)
    codes[0] = 2**bits - 1  # every bit set: sign bits of the int32 words
    want = _bitwise_pack(codes, bits)
    assert torch.equal(pack(codes, bits), want)
    assert torch.equal(unpack(want, bits, n), codes)


def test_layout_is_a_little_endian_bitstream():
    assert pack(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    # 3 bits: value 10 (code 5) straddles words 0 and 1: bits 30..32
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 5  # 0b101 at stream bits 30, 31, 32
    words = pack(codes, 3)
    assert words.shape == (1, 3)
    assert (words[0, 0].item() & 0xFFFFFFFF) == 1 << 30 and words[0, 1].item() == 1
    assert pack(torch.full((1, 8), 255, dtype=torch.uint8), 8).tolist() == [[-1, -1]]  # all ones
