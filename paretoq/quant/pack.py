"""Packing integer codes into 32-bit words, for checkpoints.

Layout (one for every bit width): each row of codes ``[out, in]`` is a little-endian bitstream in
which value ``j`` occupies bits ``[j*b, (j+1)*b)``; word ``w`` of the row holds stream bits
``[32w, 32w+32)``, bit 0 lowest. For 2, 4 and 8 bits a word holds 16, 8 or 4 whole values; for
3 bits, 32 values fill exactly three words. A row takes ``ceil(in * b / 32)`` words. The Triton
runtime may choose its own layout; this one only has to be exact and compact on disk.
"""

from __future__ import annotations

import math

import torch

_ROWS_PER_CHUNK = 1024  # bounds the temporary bit tensors for large matrices


def packed_words(in_features: int, bits: int) -> int:
    return math.ceil(in_features * bits / 32)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes [rows, in]`` (values < 2^bits) -> int32 ``[rows, ceil(in*bits/32)]``."""
    rows, n = codes.shape
    words = packed_words(n, bits)
    out = torch.empty(rows, words, dtype=torch.int32, device=codes.device)
    shifts = torch.arange(bits, device=codes.device)
    weights = torch.ones(32, dtype=torch.int64, device=codes.device) << torch.arange(32, device=codes.device)
    for r0 in range(0, rows, _ROWS_PER_CHUNK):
        c = codes[r0 : r0 + _ROWS_PER_CHUNK].long()
        stream = ((c[..., None] >> shifts) & 1).reshape(c.shape[0], n * bits)
        stream = torch.nn.functional.pad(stream, (0, words * 32 - n * bits))
        w = (stream.reshape(c.shape[0], words, 32) * weights).sum(-1)  # in [0, 2^32)
        out[r0 : r0 + _ROWS_PER_CHUNK] = (w - ((w >> 31) << 32)).to(torch.int32)  # two's complement
    return out


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of ``pack``: int32 ``[rows, words]`` -> uint8 codes ``[rows, in_features]``."""
    rows = packed.shape[0]
    out = torch.empty(rows, in_features, dtype=torch.uint8, device=packed.device)
    bit32 = torch.arange(32, device=packed.device)
    weights = torch.ones(bits, dtype=torch.int64, device=packed.device) << torch.arange(bits, device=packed.device)
    for r0 in range(0, rows, _ROWS_PER_CHUNK):
        w = packed[r0 : r0 + _ROWS_PER_CHUNK].long() & 0xFFFFFFFF
        stream = ((w[..., None] >> bit32) & 1).reshape(w.shape[0], -1)[:, : in_features * bits]
        out[r0 : r0 + _ROWS_PER_CHUNK] = (stream.reshape(w.shape[0], in_features, bits) * weights).sum(-1).to(torch.uint8)
    return out
