"""The packed weight layout the kernels read, its torch unpacking, and the converter from codes.

A component ``W [N, K]`` (``[out, in]``) at ``bits`` is stored as

- ``qweight`` int32 ``[N, row_words(K, bits)]``: each row's codes packed along K (the input
  dimension) into 32-bit words, bit 0 lowest. A row is one or two *planes*; a plane of ``p`` bits
  holds ``32 // p`` whole values per word, value ``k`` at word ``k // (32/p)``, shift
  ``(k % (32/p)) * p``, words past the row's end zero-filled. 2, 4 and 8 bits are one plane, so
  their rows are exactly `paretoq.quant.pack`'s bitstream (the checkpoint's). 3 bits are a 2-bit
  plane (the low bits, ``ceil(K/16)`` words) followed in the same row by a 1-bit plane (the high
  bit, ``ceil(K/32)`` words): every value is one shift and one mask in each plane, no value
  straddles two words (the checkpoint's 3-bit bitstream straddles at values 10 and 21 of every 32),
  and both planes are read with the same code as the 2-bit and 1-bit layouts.
- ``scales`` and ``zeros`` ``[N, G]`` (fp16 or bf16, ``G = ceil(K / group_size)``): code ``q`` of
  column ``k`` stands for ``scales[n, k // group_size] * (q - zeros[n, k // group_size])``.

Experts of one MoE layer stack these along a leading dimension (``[C, N, row_words]``): one buffer
per bit width, addressed by a per-expert slot table (see ``kernels/moe.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from paretoq.quant.pack import pack
from paretoq.quant.quantizer import QuantizedTensor

KERNEL_BITS = (2, 3, 4, 8)


def planes(bits: int) -> tuple[int, ...]:
    """Bits per plane, low plane first: 3 bits are a 2-bit plane plus a 1-bit plane."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"the kernels pack 2, 3, 4 or 8 bits, not {bits}")
    return (2, 1) if bits == 3 else (bits,)


def plane_words(in_features: int, plane_bits: int) -> int:
    return math.ceil(in_features * plane_bits / 32)


def row_words(in_features: int, bits: int) -> int:
    return sum(plane_words(in_features, p) for p in planes(bits))


@dataclass
class PackedWeight:
    """One component (or a stack ``[C, ...]`` of same-shape components) in the kernel layout."""

    qweight: torch.Tensor  # int32 [..., N, row_words]
    scales: torch.Tensor  # [..., N, G]
    zeros: torch.Tensor  # [..., N, G]
    bits: int
    in_features: int
    group_size: int  # columns per group; == in_features for one group per row

    @property
    def out_features(self) -> int:
        return self.qweight.shape[-2]

    def nbytes(self) -> int:
        """Bytes a kernel reads for the whole tensor: packed words, scales and zeros."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))

    def to(self, device) -> PackedWeight:
        return PackedWeight(self.qweight.to(device), self.scales.to(device), self.zeros.to(device), self.bits,
                            self.in_features, self.group_size)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., N, K]`` -> int32 ``[..., N, row_words]`` (reuses the checkpoint's packer per plane)."""
    lead, K = codes.shape[:-1], codes.shape[-1]
    rows = codes.reshape(-1, K)
    if bits == 3:
        words = torch.cat([pack(rows & 3, 2), pack(rows >> 2, 1)], dim=1)
    else:
        words = pack(rows, bits)
    return words.reshape(*lead, words.shape[-1])


def _unpack_plane(words: torch.Tensor, plane_bits: int, in_features: int) -> torch.Tensor:
    """The torch mirror of the kernels' unpack: broadcast shifts over each word, mask, flatten."""
    vpw = 32 // plane_bits
    shifts = torch.arange(vpw, device=words.device, dtype=torch.int32) * plane_bits
    vals = (words[..., None] >> shifts) & ((1 << plane_bits) - 1)  # arithmetic shift; the mask drops sign bits
    return vals.flatten(-2)[..., :in_features]


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """int32 ``[..., N, row_words]`` -> int32 codes ``[..., N, K]``."""
    codes, start, shift = None, 0, 0
    for p in planes(bits):
        n = plane_words(in_features, p)
        part = _unpack_plane(qweight[..., start : start + n], p, in_features) << shift
        codes = part if codes is None else codes | part
        start, shift = start + n, shift + p
    return codes


def pack_weight(q: QuantizedTensor, scale_dtype: torch.dtype = torch.float16) -> PackedWeight:
    """The kernel layout of a quantized tensor (``[..., N, K]``, experts may be stacked)."""
    K = q.codes.shape[-1]
    return PackedWeight(pack_codes(q.codes, q.bits), q.scales.to(scale_dtype).contiguous(),
                        q.zeros.to(scale_dtype).contiguous(), q.bits, K, q.group_size)


def stack(weights: list[PackedWeight]) -> PackedWeight:
    """Same-shape, same-width components as one ``[C, N, ...]`` buffer."""
    w0 = weights[0]
    assert all((w.bits, w.in_features, w.group_size, w.qweight.shape) ==
               (w0.bits, w0.in_features, w0.group_size, w0.qweight.shape) for w in weights)
    return PackedWeight(torch.stack([w.qweight for w in weights]), torch.stack([w.scales for w in weights]),
                        torch.stack([w.zeros for w in weights]), w0.bits, w0.in_features, w0.group_size)


def dequantize(w: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., N, K]`` weights in ``dtype``: codes unpacked, then ``scale * (q - zero)`` per group."""
    q = unpack_codes(w.qweight, w.bits, w.in_features)
    G = w.scales.shape[-1]  # groups tile the row (paretoq.quant.quantizer.group_columns)
    q = q.reshape(*q.shape[:-1], G, w.in_features // G).float()
    W = (q - w.zeros.float()[..., None]) * w.scales.float()[..., None]
    return W.flatten(-2).to(dtype)


def from_checkpoint(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, in_features: int,
                    group_size: int) -> PackedWeight:
    """A checkpoint's component (`paretoq.quant.pack` bitstream) in the kernel layout.

    2, 4 and 8 bits are taken as they are; only 3-bit rows are re-packed into their two planes.
    """
    if bits == 3:
        from paretoq.quant.pack import unpack

        qweight = pack_codes(unpack(qweight, 3, in_features), 3)
    return PackedWeight(qweight.contiguous(), scales.contiguous(), zeros.contiguous(), bits, in_features, group_size)
