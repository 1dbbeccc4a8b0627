"""GPTQ (Frantar et al., 2023), batched over matrices of one shape (a layer's routed experts).

Columns are quantized one at a time; each one's rounding error is spread over the columns not
yet quantized through the upper Cholesky factor of the inverse Hessian (Algorithm 1), with lazy
updates: inside a block of columns the update is local, and the rest of the matrix is updated
once per block. Group grids are fixed when the first column of a group is reached, from the
weights as updated so far. With ``act_order`` (desc_act) columns go in order of decreasing
Hessian diagonal and the group grids are fixed up front from the original weights ("static
groups"), so every group stays a contiguous run of columns in the stored order.

Names follow the paper and the reference code: ``H``, ``Hinv``, ``W1``, ``Q1``, ``Err1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paretoq.quant.quantizer import QuantizedTensor, QuantSettings, grid_params, group_columns, quantize_codes

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

    scales = torch.zeros(E, R, G, dtype=dtype, device=W.device)
    zeros = torch.zeros(E, R, G, dtype=dtype, device=W.device)
    perm = None
    if settings.act_order:
        s, z = grid_params(W.reshape(E, R, G, cols), bits, settings.sym)  # static groups
        scales.copy_(s)
        zeros.copy_(z)
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
                    scales[:, :, g], zeros[:, :, g] = grid_params(ahead, bits, settings.sym)
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
