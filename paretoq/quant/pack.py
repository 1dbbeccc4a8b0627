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

_ROWS_PER_CHUNK = 4096  # bounds the temporaries (int64, a few per value) for large matrices


def packed_words(in_features: int, bits: int) -> int:
    return math.ceil(in_features * bits / 32)


def _positions(n: int, bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each value's word and bit offset in its row's stream."""
    start = torch.arange(n, dtype=torch.int64, device=device) * bits
    return start // 32, start % 32


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes [rows, in]`` (values < 2^bits) -> int32 ``[rows, ceil(in*bits/32)]``."""
    rows, n = codes.shape
    words = packed_words(n, bits)
    word, offset = _positions(n, bits, codes.device)
    spill = offset + bits > 32  # a value whose high bits go into the next word (3 bits: 2 in 32)
    out = torch.empty(rows, words, dtype=torch.int32, device=codes.device)
    for r0 in range(0, rows, _ROWS_PER_CHUNK):
        c = codes[r0 : r0 + _ROWS_PER_CHUNK].long()
        acc = torch.zeros(c.shape[0], words + 1, dtype=torch.int64, device=codes.device)
        acc.scatter_add_(1, word.expand_as(c), (c << offset) & 0xFFFFFFFF)  # disjoint bits: adding is or-ing
        if spill.any():
            acc.scatter_add_(1, (word[spill] + 1).expand(c.shape[0], -1), c[:, spill] >> (32 - offset[spill]))
        w = acc[:, :words]
        out[r0 : r0 + _ROWS_PER_CHUNK] = (w - ((w >> 31) << 32)).to(torch.int32)  # two's complement
    return out


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of ``pack``: int32 ``[rows, words]`` -> uint8 codes ``[rows, in_features]``.

    Whole values per word for 2, 4 and 8 bits; for 3 bits, 32 values per three words when rows hold
    whole triples (``in_features`` a multiple of 32); otherwise each value from the 64-bit pair of
    words around it. A trial unpacks a layer's codes for every component it swaps in, so this is on
    the search's hot path (12x faster at 4 bits than reading bit by bit)."""
    rows = packed.shape[0]
    out = torch.empty(rows, in_features, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    if 32 % bits == 0:
        shifts = torch.arange(32 // bits, dtype=torch.int32, device=packed.device) * bits
    elif bits == 3 and in_features % 32 == 0:
        starts = torch.arange(32, dtype=torch.int64, device=packed.device) * 3  # value j at bits 3j..3j+2 of 96
    else:
        word, offset = _positions(in_features, bits, packed.device)
    for r0 in range(0, rows, _ROWS_PER_CHUNK):
        w = packed[r0 : r0 + _ROWS_PER_CHUNK]
        if 32 % bits == 0:  # int32 shifts: the sign bits an arithmetic shift brings in are masked off
            vals = ((w[..., None] >> shifts) & mask).reshape(w.shape[0], -1)[:, :in_features]
        elif bits == 3 and in_features % 32 == 0:
            u = (w.long() & 0xFFFFFFFF).reshape(w.shape[0], -1, 3)
            lo, hi = u[..., 0] | (u[..., 1] << 32), u[..., 1] | (u[..., 2] << 32)  # stream bits 0-63, 32-95
            vals = torch.cat([(lo[..., None] >> starts[:21]) & mask,  # values 0-20 end by bit 63
                              (hi[..., None] >> (starts[21:] - 32)) & mask], -1).reshape(w.shape[0], -1)
        else:
            u = torch.nn.functional.pad(w.long() & 0xFFFFFFFF, (0, 1))
            vals = ((u[:, word] | (u[:, word + 1] << 32)) >> offset) & mask
        out[r0 : r0 + _ROWS_PER_CHUNK] = vals.to(torch.uint8)
    return out
