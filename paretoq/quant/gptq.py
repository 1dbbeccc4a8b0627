"""GPTQ (Frantar et al., 2023), batched over matrices of one shape (a layer's routed experts).

Columns are quantized one at a time; each one's rounding error is spread over the columns not
yet quantized through the upper Cholesky factor of the inverse Hessian (Algorithm 1), with lazy
updates: inside a block of columns the update is local, and the rest of the matrix is updated
once per block. Group grids are fixed when the first column of a group is reached, from the
weights as updated so far. With ``act_order`` (desc_act) columns go in order of decreasing
Hessian diagonal and the group grids are fixed up front from the original weights ("static
groups"), so every group stays a contiguous run of columns in the stored order.

Grids (``settings.grid == "search"``, the default) are searched over min-max ranges shrunk by a
factor ``p`` in [0.2, 1], per row, scored on GPTQ's own loss ``sum (w - q)^2 / Hinv_cc^2``. A
group that fits in a block is scored exactly: GPTQ is run on the group's columns alone for every
candidate (the updates inside the group included), so each row gets the grid under which its
group adds least to the layer error, given the columns before it; min-max (``p = 1``) is a
candidate, so the group never does worse than under it. Per channel (a group wider than a block)
and with act-order (static groups, whose columns come up at scattered times) the score is the
group's rounding error weighted by ``1 / Hinv_cc^2``, before any update (``grid_search``).

Why not min-max: the weights a group's grid is fixed on carry the compensation of every column
quantized before it (``err_i * Hinv_ij / Hinv_ii``, magnified where an outlier input channel's
error spreads to its correlated neighbours), which widens the group's range; and the group's own
updates widen it further after the grid is fixed. At 2 bits a min-max grid is far too coarse. The
reference implementation (IST-DASLab/gptq) fixes grids on the weights as they stood at the start
of the 128-column block, missing the updates made inside it: a narrower grid that clips the grown
weights, by accident. That wins at 2 bits (paretoq's min-max grid on the updated weights was
1.02-1.30x its error at groups 32/64) and loses at 8 (0.89x), where clipping costs more than the
step it saves. The search clips on purpose, where it pays: docs/benchmarks.md, "GPTQ against the
original implementation".

Names follow the paper and the reference code: ``H``, ``Hinv``; a block's working copies are held
column-major (``Wt``, ``Qt``, ``Errt``: ``[columns, E, rows]``) so that each column is contiguous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from paretoq.quant.quantizer import (GRIDS, QuantizedTensor, QuantSettings, grid_params, grid_range, grid_search,
                                     group_columns, quantize_codes, shrunk_grid)

MAX_DAMP_RETRIES = 6  # each retry multiplies the damping by 10
# Shrink factors: a coarse pass, then a fine one around each row's best (the 8-bit optimum is near
# p = 0.99). 24 trial runs of a group; 12 (steps of 0.1, then +-0.025 and +-0.05) left 1.1-1.4x
# more error at 8 bits and up to 1.2x at 4, for a fifth less time (studies/gptq_reference problems).
SHRINK_COARSE = tuple(1 - i / 20 for i in range(16))  # 1.0, 0.95, ..., 0.25
SHRINK_FINE = (-0.04, -0.03, -0.02, -0.01, 0.01, 0.02, 0.03, 0.04)
SEARCH_CHUNK = 8  # candidates run at once: memory is this many copies of a group's block
SEARCH_SUBBLOCK = 16  # lazy-update block inside a group's trial runs
SUBBLOCK = 32  # the main loop's inner lazy-update block (divides the block and the group)


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


def _group_loss(Wg: torch.Tensor, Hg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's loss for each candidate grid ``scale, zero [K, E, R]`` when the group ``Wg [E, R, cols]``
    alone is quantized with it, column by column, with ``Hg [E, cols, cols]`` (the group's block of
    the upper Cholesky factor of H^-1): the exact rise of the layer error, given the columns before."""
    K, cols = scale.shape[0], Wg.shape[-1]
    Wk = Wg.permute(2, 0, 1)[:, None].expand(cols, K, *Wg.shape[:-1]).clone()  # [cols, K, E, R]: columns contiguous
    loss = torch.zeros_like(scale)
    HgT = Hg.permute(1, 2, 0)[:, :, None, :, None]  # [cols, cols, 1, E, 1]: Hg[e, i, j] at [i, j, 0, e, 0]
    for j1 in range(0, cols, SEARCH_SUBBLOCK):  # lazy updates, as in the main loop
        j2 = min(j1 + SEARCH_SUBBLOCK, cols)
        Err = torch.empty_like(Wk[j1:j2])
        for j in range(j1, j2):
            w = Wk[j]
            err = (w - scale * (quantize_codes(w, scale, zero, bits) - zero)) / HgT[j, j]
            loss += err**2
            Wk[j + 1 : j2] -= err * HgT[j, j + 1 : j2]
            Err[j - j1] = err
        if j2 < cols:
            Wk[j2:] -= torch.einsum("bker,ebn->nker", Err, Hg[:, j1:j2, j2:])
    return loss


def _search_grid(Wg: torch.Tensor, Hg: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``Wg [E, R, cols]``, the shrunk min-max grid with the least ``_group_loss``."""
    xmin, xmax = grid_range(Wg, sym)
    best_p = best = None
    coarse = torch.tensor(SHRINK_COARSE, dtype=Wg.dtype, device=Wg.device)[:, None, None].expand(-1, *xmin.shape)
    for P in (coarse, None):
        if P is None:  # the fine pass, around each row's best coarse factor
            fine = torch.tensor(SHRINK_FINE, dtype=Wg.dtype, device=Wg.device)[:, None, None]
            P = (best_p + fine).clamp(0.2, 1.0)
        for k in range(0, P.shape[0], SEARCH_CHUNK):
            p = P[k : k + SEARCH_CHUNK]
            loss = _group_loss(Wg, Hg, *shrunk_grid(xmin, xmax, p, bits, sym), bits)
            if best is None:  # the first candidate is p = 1, the min-max grid
                best_p, best = p[0], loss[0]
                p, loss = p[1:], loss[1:]
            if loss.shape[0]:
                i = loss.argmin(0, keepdim=True)
                chunk_best, chunk_p = loss.gather(0, i)[0], p.gather(0, i)[0]
                better = chunk_best < best
                best = torch.where(better, chunk_best, best)
                best_p = torch.where(better, chunk_p, best_p)
    return shrunk_grid(xmin, xmax, best_p, bits, sym)


@dataclass
class HessianFactor:
    """What GPTQ needs from a batch of Hessians, for any weights that read those inputs and any width:
    computed once and shared by the projections of one input (q/k/v, gate/up) and every width."""

    hinv: torch.Tensor  # [E, C, C] upper Cholesky factor of the damped H^-1 (columns in perm order)
    dead: torch.Tensor  # [E, C] inputs no token drove (their weights are zeroed)
    damp: torch.Tensor  # [E] the damping that made H positive definite (fraction of the mean diagonal)
    perm: torch.Tensor | None  # [E, C] act-order: columns by decreasing Hessian diagonal

    def __getitem__(self, i) -> HessianFactor:
        """The factor of some matrices of the batch (an index or a list of them)."""
        return HessianFactor(self.hinv[i], self.dead[i], self.damp[i], None if self.perm is None else self.perm[i])


def hessian_factor(H: torch.Tensor, settings: QuantSettings = QuantSettings()) -> HessianFactor:
    """Damp ``H [E, C, C]`` until each matrix's Cholesky factorisation succeeds, and factor its inverse.
    Computes in float64 when ``H`` is float64, else float32."""
    dtype = torch.float64 if H.dtype == torch.float64 else torch.float32
    H = H.to(dtype).clone()
    E, C, _ = H.shape
    # Inputs no token ever drove carry no information: GPTQ zeroes the weights and pins the diagonal.
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    perm = None
    if settings.act_order:
        perm = torch.argsort(diag, dim=-1, descending=True)  # [E, C]
        H = H.gather(1, perm[:, :, None].expand(E, C, C)).gather(2, perm[:, None, :].expand(E, C, C))
    damp = torch.full((E,), settings.damp, dtype=dtype, device=H.device)
    mean_diag = H.diagonal(dim1=-2, dim2=-1).mean(-1)
    eye = torch.eye(C, dtype=dtype, device=H.device)
    for _ in range(MAX_DAMP_RETRIES):
        L, info = torch.linalg.cholesky_ex(H + (damp * mean_diag)[:, None, None] * eye)
        if not (info != 0).any():
            break
        damp = torch.where(info != 0, damp * 10, damp)
    else:
        raise RuntimeError(f"Hessian not positive definite even at damping {damp.max().item():g}")
    del H
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    return HessianFactor(hinv, dead, damp, perm)


def gptq(W: torch.Tensor, H: torch.Tensor | None, bits: int, settings: QuantSettings = QuantSettings(),
         factor: HessianFactor | None = None) -> GPTQResult:
    """Quantize ``W [E, out, in]`` (or ``[out, in]``) given input Hessians ``H [E, in, in]`` (or ``[in, in]``),
    or their ``factor`` (``hessian_factor``, made with the same settings) in place of ``H``.

    ``H`` may be the raw sum of ``x x^T``: GPTQ is invariant to its scale, and damping is relative.
    Computes in float64 when ``W`` or ``H`` is float64, else float32.
    """
    single = W.dim() == 2
    if single:  # a factor is always of a batch (here, of one)
        W = W[None]
        H = None if H is None else H[None]
    if factor is None:
        factor = hessian_factor(H.double() if W.dtype == torch.float64 else H, settings)
    dtype = torch.float64 if torch.float64 in (W.dtype, factor.hinv.dtype) else torch.float32
    W = W.to(dtype).clone()
    Hinv = factor.hinv.to(dtype)
    E, R, C = W.shape
    cols = group_columns(C, settings.group_size)
    G = C // cols
    W.masked_fill_(factor.dead[:, None, :], 0.0)

    if settings.grid not in GRIDS:
        raise ValueError(f"unknown grid {settings.grid!r}; choose one of {GRIDS}")
    scales = torch.zeros(E, R, G, dtype=dtype, device=W.device)
    zeros = torch.zeros(E, R, G, dtype=dtype, device=W.device)
    perm = factor.perm
    if perm is not None:
        W0 = W  # static groups: grids from the original weights, once the loss weights are known
        W = W.gather(2, perm[:, None, :].expand(E, R, C))
        group_of = perm // cols
    damp = factor.damp
    loss_weight = Hinv.diagonal(dim1=-2, dim2=-1) ** -2  # [E, C]: GPTQ's loss is sum (w - q)^2 / Hinv_cc^2

    def fit(w: torch.Tensor, weight: torch.Tensor, c: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid of the group ``w``; ``c``: its first column, when it is quantized next in order."""
        if settings.grid == "minmax":
            return grid_params(w, bits, settings.sym)
        if c is not None and w.shape[-1] <= settings.block_size:
            return _search_grid(w, Hinv[:, c : c + w.shape[-1], c : c + w.shape[-1]], bits, settings.sym)
        return grid_search(w, bits, settings.sym, weight)

    if perm is not None:
        weight0 = torch.empty_like(loss_weight).scatter_(1, perm, loss_weight)  # back to the stored order
        s, z = fit(W0.reshape(E, R, G, cols), weight0.reshape(E, 1, G, cols))
        scales.copy_(s)
        zeros.copy_(z)

    Q = torch.zeros_like(W)
    losses = torch.zeros(E, dtype=dtype, device=W.device)
    block = _block_size(cols, settings.block_size)
    # Lazy updates on two levels: a column's error reaches the rest of its sub-block at once, the
    # rest of the block once per sub-block (a batched matmul), the rest of the matrix once per block.
    # The same arithmetic as one level, in a fifth of the element-wise work. Sub-blocks divide the
    # group, so a group's grid is fitted on fully updated weights.
    sub = math.gcd(block, cols, SUBBLOCK)
    rows = torch.arange(R, device=W.device)
    for i1 in range(0, C, block):
        i2 = min(i1 + block, C)
        n = i2 - i1
        Wt = W[:, :, i1:i2].permute(2, 0, 1).contiguous()  # [n, E, R]: a column is contiguous
        Qt = torch.zeros_like(Wt)
        Errt = torch.zeros_like(Wt)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        for j1 in range(0, n, sub):
            j2 = min(j1 + sub, n)
            for j in range(j1, j2):
                c = i1 + j
                w = Wt[j]
                d = Hinv1[:, j, j][:, None]
                if perm is not None:
                    g = group_of[:, c]  # [E]
                    s = scales[torch.arange(E)[:, None], rows[None, :], g[:, None]]
                    z = zeros[torch.arange(E)[:, None], rows[None, :], g[:, None]]
                else:
                    g = c // cols
                    if c % cols == 0:  # the group's first column: fix its grid on the updated weights
                        ahead = torch.cat([Wt[j:].permute(1, 2, 0), W[:, :, i2:]], dim=-1)[:, :, :cols]
                        scales[:, :, g], zeros[:, :, g] = fit(ahead, loss_weight[:, None, c : c + cols], c)
                    s, z = scales[:, :, g], zeros[:, :, g]
                q = quantize_codes(w, s, z, bits)
                err = (w - s * (q - z)) / d
                Qt[j] = q
                losses += (err**2).sum(-1) / 2
                Wt[j + 1 : j2] -= err[None] * Hinv1[:, j, j + 1 : j2].T[:, :, None]
                Errt[j] = err
            if j2 < n:
                Wt[j2:] -= torch.einsum("ker,ekn->ner", Errt[j1:j2], Hinv1[:, j1:j2, j2:])
        Q[:, :, i1:i2] = Qt.permute(1, 2, 0)
        W[:, :, i2:] -= Errt.permute(1, 2, 0) @ Hinv[:, i1:i2, i2:]

    if perm is not None:
        Q = Q.gather(2, torch.argsort(perm, dim=-1)[:, None, :].expand(E, R, C))
    qt = QuantizedTensor(Q.to(torch.uint8), scales.float(), zeros.float(), bits, cols)
    result = GPTQResult(qt, losses.float(), damp.float())
    if single:
        result = GPTQResult(qt[0], losses[0].float(), damp[0].float())
    return result
