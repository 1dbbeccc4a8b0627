"""GPTQ (Frantar et al., 2023), batched over matrices of one shape (a layer's routed experts).

Columns are quantized one at a time; each one's rounding error is spread over the columns not
yet quantized through the upper Cholesky factor of the inverse Hessian (Algorithm 1), with lazy
updates: inside a block of columns the update is local, and the rest of the matrix is updated
once per block. Group grids are fixed when the first column of a group is reached, from the
weights as updated so far. With ``act_order`` (desc_act) columns go in order of decreasing
Hessian diagonal and the group grids are fixed up front from the original weights ("static
groups"), so every group stays a contiguous run of columns in the stored order.

A grid is chosen (``settings.grid == "mse"``) by ``grid_search`` to minimise the group's share of
GPTQ's own loss, ``sum (w - q)^2 / Hinv_cc^2``, over shrunk min-max ranges. Why not min-max: the
weights a group's grid is fixed on carry the compensation of every column quantized before it
(``err_i * Hinv_ij / Hinv_ii``, magnified where an outlier input channel's error spreads to its
correlated neighbours), which widens the group's range; at 2 bits a min-max grid on them is too
coarse. The reference implementation (IST-DASLab/gptq) fixes grids on the weights as they stood at
the start of the 128-column block, missing the updates made inside it: a narrower grid that clips
the grown weights, by accident. That wins at 2 bits (paretoq's min-max grid on the updated weights
was 1.02-1.30x its error at groups 32/64) and loses at 8 (0.89x), where clipping costs more than
the step it saves. The weighted search clips on purpose, where it pays (docs/benchmarks.md).

Names follow the paper and the reference code: ``H``, ``Hinv``, ``W1``, ``Q1``, ``Err1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paretoq.quant.quantizer import (GRIDS, QuantizedTensor, QuantSettings, grid_params, grid_search, group_columns,
                                     quantize_codes)

MAX_DAMP_RETRIES = 6  # each retry multiplies the damping by 10


@dataclass
class GPTQResult:
    q: QuantizedTensor
    loss: torch.Tensor  # [E] GPTQ's error proxy: sum over columns of (w - q)^2 / Hinv_cc^2 / 2
    damp: torch.Tensor  # [E] the damping that made H positive definite (fraction of the mean diagonal)


def _block_size(cols: int, block: int) -> int:
    """A lazy-update block that never splits a group in the middle (so grids see updated weights)."""
    if cols <= block:
        return (block // cols) * cols
    return block if cols % block == 0 else cols


def gptq(W: torch.Tensor, H: torch.Tensor, bits: int, settings: QuantSettings = QuantSettings()) -> GPTQResult:
    """Quantize ``W [E, out, in]`` (or ``[out, in]``) given input Hessians ``H [E, in, in]`` (or ``[in, in]``).

    ``H`` may be the raw sum of ``x x^T``: GPTQ is invariant to its scale, and damping is relative.
    Computes in float64 when ``W`` or ``H`` is float64, else float32.
    """
    single = W.dim() == 2
    if single:
        W, H = W[None], H[None]
    dtype = torch.float64 if torch.float64 in (W.dtype, H.dtype) else torch.float32
    W = W.to(dtype).clone()
    H = H.to(dtype).clone()
    E, R, C = W.shape
    cols = group_columns(C, settings.group_size)
    G = C // cols

    # Inputs no token ever drove carry no information: GPTQ zeroes the weights and pins the diagonal.
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    W.masked_fill_(dead[:, None, :], 0.0)

    if settings.grid not in GRIDS:
        raise ValueError(f"unknown grid {settings.grid!r}; choose one of {GRIDS}")
    scales = torch.zeros(E, R, G, dtype=dtype, device=W.device)
    zeros = torch.zeros(E, R, G, dtype=dtype, device=W.device)
    perm = None
    if settings.act_order:
        W0 = W  # static groups: grids from the original weights, once the loss weights are known
        perm = torch.argsort(diag, dim=-1, descending=True)  # [E, C]
        W = W.gather(2, perm[:, None, :].expand(E, R, C))
        H = H.gather(1, perm[:, :, None].expand(E, C, C)).gather(2, perm[:, None, :].expand(E, C, C))
        group_of = perm // cols

    # Dampen until the Cholesky factorisation succeeds, matrix by matrix.
    damp = torch.full((E,), settings.damp, dtype=dtype, device=W.device)
    mean_diag = H.diagonal(dim1=-2, dim2=-1).mean(-1)
    eye = torch.eye(C, dtype=dtype, device=W.device)
    for _ in range(MAX_DAMP_RETRIES):
        L, info = torch.linalg.cholesky_ex(H + (damp * mean_diag)[:, None, None] * eye)
        if not (info != 0).any():
            break
        damp = torch.where(info != 0, damp * 10, damp)
    else:
        raise RuntimeError(f"Hessian not positive definite even at damping {damp.max().item():g}")
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    loss_weight = Hinv.diagonal(dim1=-2, dim2=-1) ** -2  # [E, C]: GPTQ's loss is sum (w - q)^2 / Hinv_cc^2

    def fit(w: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if settings.grid == "minmax":
            return grid_params(w, bits, settings.sym)
        return grid_search(w, bits, settings.sym, weight)

    if perm is not None:
        weight0 = torch.empty_like(loss_weight).scatter_(1, perm, loss_weight)  # back to the stored order
        s, z = fit(W0.reshape(E, R, G, cols), weight0.reshape(E, 1, G, cols))
        scales.copy_(s)
        zeros.copy_(z)

    Q = torch.zeros_like(W)
    losses = torch.zeros(E, dtype=dtype, device=W.device)
    block = _block_size(cols, settings.block_size)
    rows = torch.arange(R, device=W.device)
    for i1 in range(0, C, block):
        i2 = min(i1 + block, C)
        W1 = W[:, :, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            w = W1[:, :, i]
            d = Hinv1[:, i, i][:, None]
            if perm is not None:
                g = group_of[:, c]  # [E]
                s = scales[torch.arange(E)[:, None], rows[None, :], g[:, None]]
                z = zeros[torch.arange(E)[:, None], rows[None, :], g[:, None]]
            else:
                g = c // cols
                if c % cols == 0:  # the group's first column: fix its grid on the updated weights
                    ahead = torch.cat([W1[:, :, i:], W[:, :, i2:]], dim=-1)[:, :, :cols]
                    scales[:, :, g], zeros[:, :, g] = fit(ahead, loss_weight[:, None, c : c + cols])
                s, z = scales[:, :, g], zeros[:, :, g]
            q = quantize_codes(w, s, z, bits)
            deq = s * (q - z)
            Q1[:, :, i] = q
            losses += ((w - deq) ** 2 / d**2).sum(-1) / 2
            err = (w - deq) / d
            W1[:, :, i:] -= err[:, :, None] * Hinv1[:, i, i:][:, None, :]
            Err1[:, :, i] = err
        Q[:, :, i1:i2] = Q1
        W[:, :, i2:] -= Err1 @ Hinv[:, i1:i2, i2:]

    if perm is not None:
        Q = Q.gather(2, torch.argsort(perm, dim=-1)[:, None, :].expand(E, R, C))
    qt = QuantizedTensor(Q.to(torch.uint8), scales.float(), zeros.float(), bits, cols)
    result = GPTQResult(qt, losses.float(), damp.float())
    if single:
        result = GPTQResult(qt[0], losses[0].float(), damp[0].float())
    return result
