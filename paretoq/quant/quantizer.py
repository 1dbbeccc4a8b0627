"""Group-wise uniform quantization: the grid, round-to-nearest, and the quantized tensor type.

A weight ``W [out, in]`` is split along the input dimension into groups of ``group_size``
columns (``-1``: one group per row, i.e. per channel). Each row of each group has a scale and an
integer zero point; a code ``q in [0, 2^bits)`` stands for ``scale * (q - zero)``. As in GPTQ's
quantizer, the grid always contains 0 (the range is widened to include it) and the symmetric
variant fixes ``zero = 2^(bits-1)``.

GPTQ (gptq.py) chooses each group's grid by a search over shrunk min-max ranges (``shrunk_grid``)
scored on its own loss, by default; ``grid_search`` is the cheap form of that search, scored on
the rounding error alone. The min-max grid (``grid="minmax"``, what the reference implementation
uses) is always a candidate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paretoq.quant import BITS  # noqa: F401  (re-exported)
from paretoq.quant.settings import GRIDS, GROUP_SIZES, QuantSettings, check_group_size  # noqa: F401  (re-exported)

GRID_STEPS = 100  # shrink factors 1, 0.99, ..., 0.21: the reference quantizer's MSE grid (grid=100, maxshrink=.8)
GRID_MAX_SHRINK = 0.8


@dataclass
class QuantizedTensor:
    """Integer codes with per-(row, group) scales and zero points; ``[..., out, in]`` (experts may batch)."""

    codes: torch.Tensor  # uint8 [..., out, in], each in [0, 2^bits)
    scales: torch.Tensor  # float32 [..., out, groups]
    zeros: torch.Tensor  # float32 [..., out, groups], integers in [0, 2^bits)
    bits: int
    group_size: int  # columns per group (the full row when per channel)

    def dequantize(self) -> torch.Tensor:
        g = torch.arange(self.codes.shape[-1], device=self.codes.device) // self.group_size
        return (self.codes.float() - self.zeros[..., g]) * self.scales[..., g]

    def __getitem__(self, i) -> QuantizedTensor:
        """One matrix of a batch (e.g. one expert)."""
        return QuantizedTensor(self.codes[i], self.scales[i], self.zeros[i], self.bits, self.group_size)


@dataclass
class GGMLTensor:
    """A matrix as a ggml type stores it: ``data`` uint8 ``[..., out, row bytes]`` (the GGUF's bytes;
    experts may batch) of type ``ggml_type``, dequantized by gguf's own dequantizers."""

    data: torch.Tensor
    ggml_type: str  # two types joined by "+" for a kv_b_proj stored split (``split``)
    bits: int  # the plan's width that chose the type
    # DeepSeek's kv_b_proj as llama.cpp's converter stores it, two tensors (`paretoq.quant.ggml.kv_b_split`):
    # (heads, nope, v, kv_lora_rank); ``data`` then holds attn_k_b's bytes, then attn_v_b's, flat.
    split: tuple[int, ...] = ()

    def dequantize(self) -> torch.Tensor:
        from paretoq.quant.ggml import dequantize, merge_kv_b, row_bytes

        if self.split:
            heads, nope, v, r = self.split
            (tk, tv), flat = self.ggml_type.split("+"), self.data.numpy()
            k_rows, k_bytes = heads * r, heads * r * row_bytes(tk, nope)
            k_b = dequantize(flat[:k_bytes].reshape(k_rows, -1), tk).reshape(heads, r, nope)
            v_b = dequantize(flat[k_bytes:].reshape(heads * v, -1), tv).reshape(heads, v, r)
            return torch.from_numpy(merge_kv_b(k_b, v_b))
        flat = self.data.reshape(-1, self.data.shape[-1]).numpy()
        w = torch.from_numpy(dequantize(flat, self.ggml_type))
        return w.reshape(*self.data.shape[:-1], w.shape[-1])

    def __getitem__(self, i) -> GGMLTensor:
        return GGMLTensor(self.data[i], self.ggml_type, self.bits)


def group_columns(in_features: int, group_size: int) -> int:
    """Columns per group: ``group_size``, or the whole row for ``-1``. Groups must tile the row."""
    if group_size == -1 or group_size >= in_features:
        return in_features
    if in_features % group_size:
        raise ValueError(f"input dimension {in_features} is not a multiple of group_size {group_size}")
    return group_size


def grid_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of ``w [..., rows, cols]`` from its min and max (0 included)."""
    maxq = 2**bits - 1
    xmin = w.amin(dim=-1).clamp(max=0)
    xmax = w.amax(dim=-1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)  # an all-zero row: any grid will do
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def grid_range(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``w [..., rows, cols]``: the min and max, widened to contain 0 (symmetric about 0
    with ``sym``); an all-zero row gets [-1, 1], any grid will do."""
    xmin = w.amin(dim=-1).clamp(max=0)
    xmax = w.amax(dim=-1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    return torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)


def shrunk_grid(xmin: torch.Tensor, xmax: torch.Tensor, p, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the range ``[p * xmin, p * xmax]``; ``p = 1`` is ``grid_params``' grid."""
    maxq = 2**bits - 1
    scale = (xmax - xmin) * p / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin * p / scale)
    return scale, zero


def grid_search(w: torch.Tensor, bits: int, sym: bool, weight: torch.Tensor | None = None,
                steps: int = GRID_STEPS, max_shrink: float = GRID_MAX_SHRINK) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid of ``w [..., rows, cols]`` (per row) whose rounding error ``sum weight * (w - q)^2`` is
    least, over the min-max range shrunk by ``1 - i / steps`` for ``i < max_shrink * steps``.

    ``weight`` (broadcast to ``w``, e.g. ``[..., 1, cols]``) is how much an error in each column costs; in GPTQ,
    ``1 / Hinv_cc^2``, the weight of its loss ``sum (w - q)^2 / Hinv_cc^2``. Shrinking clips the
    outermost weights to the grid's ends; at 2-4 bits the finer step pays for that many times over.
    """
    weight = torch.ones_like(w) if weight is None else weight
    xmin, xmax = grid_range(w, sym)
    best_scale, best_zero, best = None, None, None
    for i in range(int(max_shrink * steps)):
        scale, zero = shrunk_grid(xmin, xmax, 1 - i / steps, bits, sym)
        q = quantize_codes(w, scale[..., None], zero[..., None], bits)
        err = ((scale[..., None] * (q - zero[..., None]) - w) ** 2 * weight).sum(-1)
        if best is None:  # p = 1 is grid_params' min-max grid
            best_scale, best_zero, best = scale, zero, err
            continue
        better = err < best
        best = torch.where(better, err, best)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``w`` on the grid ``(scale, zero)``, broadcast over the last dimension."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def rtn(W: torch.Tensor, bits: int, group_size: int = 128, sym: bool = False) -> QuantizedTensor:
    """Round-to-nearest on the group grid: the baseline GPTQ must beat. ``W [..., out, in]``."""
    W = W.float()
    cols = group_columns(W.shape[-1], group_size)
    groups = W.reshape(*W.shape[:-1], -1, cols)  # [..., out, G, cols]
    scale, zero = grid_params(groups, bits, sym)
    codes = quantize_codes(groups, scale[..., None], zero[..., None], bits)
    return QuantizedTensor(codes.reshape(W.shape).to(torch.uint8), scale, zero, bits, cols)
