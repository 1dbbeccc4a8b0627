"""Dequantizing matrix products ``x @ W.T`` on packed 2/3/4/8-bit weights: the Triton kernel, its
launcher `qmm`, and the torch reference `qmm_reference` with the same signature.

One kernel body serves the dense layer (decode GEMV, skinny GEMM and prefill GEMM, chosen by the
block shape) and both stages of the fused MoE (``kernels/moe.py``), because the inner loop is the
same: stream a row tile of packed words along K, unpack with a shift and a mask, and apply the
group's scale and zero once per tile instead of once per weight.

Per K tile of one group (the launcher keeps ``BLOCK_K`` a divisor of the group size, so a tile
never straddles two groups), with codes ``q``, activations ``a``, scale ``s`` and zero ``z``::

    sum_k a[m,k] * s[n] * (q[n,k] - z[n])  =  s[n] * (dot(a, q.T)[m,n] - z[n] * sum_k a[m,k])

so the per-weight work is one int->float conversion and one FMA (or a tensor-core dot), and the
scale/zero arithmetic is per (row, tile). This is the form GPTQ-style kernels use; its rounding
differs from dequantize-then-matmul by fp32 accumulation error only.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from paretoq.kernels.layout import PackedWeight, dequantize, plane_words

# Kernel modes (tl.constexpr MODE): which rows of A are read and which rows of the output written.
DENSE, MOE_UP, MOE_DOWN = 0, 1, 2
# Activation applied while loading A (MOE_DOWN only): none, or SwiGLU silu(gate) * up on [gate | up].
ACT_NONE, ACT_SILU_MUL = 0, 1
# The kernel reads these as compile-time constants: compiled Triton refuses a plain global int in a
# kernel (NameError at compile time), while its interpreter accepts one, so CPU runs never see it.
_DENSE, _MOE_UP, _MOE_DOWN, _ACT_SILU_MUL = (tl.constexpr(v) for v in (DENSE, MOE_UP, MOE_DOWN, ACT_SILU_MUL))
# Triton 3.9's interpreter computes bf16 `tl.dot` and int->bf16 casts wrongly (off by orders of
# magnitude, measured): under it the dot runs in fp32. Compiled kernels keep the native dot for
# fp16/bf16 activations; fp32 activations take the fp32 dot at full precision (not TF32).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _unpack_plane(row_ptrs, n_mask, k0, n_words, PBITS: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """Codes ``[BLOCK_N, BLOCK_K]`` of one plane for columns ``k0 .. k0+BLOCK_K``.

    The rows' words for the tile are contiguous (coalesced along K); every value is one shift and
    one mask of its word, broadcast over the ``32 // PBITS`` values a word holds.
    """
    VPW: tl.constexpr = 32 // PBITS
    WORDS: tl.constexpr = BLOCK_K // VPW
    offs_w = k0 // VPW + tl.arange(0, WORDS)
    words = tl.load(row_ptrs[:, None] + offs_w[None, :], mask=n_mask[:, None] & (offs_w[None, :] < n_words),
                    other=0)
    shifts = tl.arange(0, VPW) * PBITS
    vals = (words[:, :, None] >> shifts[None, None, :]) & ((1 << PBITS) - 1)  # the mask drops sign-extended bits
    return tl.reshape(vals, (BLOCK_N, BLOCK_K))


@triton.jit
def _qmm_kernel(
    a_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, out_ptr,
    sorted_ptr, block_expert_ptr, slot_ptr, route_w_ptr,
    M, N, K, G, group_size, row_words, plane0_words,
    stride_am, stride_om, stride_wc, stride_sc,
    num_experts, top_k, k_per_split,
    BITS: tl.constexpr, MODE: tl.constexpr, ACT: tl.constexpr, NUM_SLOTS: tl.constexpr,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr, ATOMIC_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)  # which K range of k_per_split columns (a multiple of BLOCK_K) this program sums

    # -- which weight matrix and which rows --------------------------------------------------------
    comp = pid_m * 0  # index of the weight matrix in this width's stacked buffer (a tensor in every mode)
    expert_slot = 0  # row of the bias table: expert * NUM_SLOTS + slot
    out_col0 = 0
    if MODE == _DENSE:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        a_rows = offs_m
        o_rows = offs_m
    else:
        # Tokens are sorted by expert and each expert's run padded to BLOCK_M (see moe_align), so an
        # M block belongs to one expert. Axis 0 enumerates (M block, slot) work items; the slot
        # table says which of them hold a matrix of this launch's width. The rest exit at once,
        # which is how one launch per width serves a layer of mixed widths.
        block = pid_m // NUM_SLOTS
        slot = pid_m % NUM_SLOTS
        e = tl.load(block_expert_ptr + block)
        if e >= num_experts:  # past the last expert's padded run
            return
        comp = tl.load(slot_ptr + e * NUM_SLOTS + slot)
        if comp < 0:  # this (expert, slot) is stored at another width
            return
        expert_slot = e * NUM_SLOTS + slot
        out_col0 = slot * N
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        sid = tl.load(sorted_ptr + offs_m)  # flat (token, k) assignment index; M marks padding
        m_mask = sid < M
        if MODE == _MOE_UP:
            a_rows = sid // top_k  # read the token's hidden state, write the sorted row
            o_rows = offs_m
        else:
            a_rows = offs_m  # read the sorted row of the up stage, write the assignment's row
            o_rows = sid

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    comp64 = comp.to(tl.int64)
    w_rows = w_ptr + comp64 * stride_wc + offs_n.to(tl.int64) * row_words
    s_rows = s_ptr + comp64 * stride_sc + offs_n * G
    z_rows = z_ptr + comp64 * stride_sc + offs_n * G
    a_rows_ptr = a_ptr + a_rows.to(tl.int64) * stride_am

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_end = tl.minimum(K, (pid_k + 1) * k_per_split)
    for k0 in range(pid_k * k_per_split, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_mask = m_mask[:, None] & (offs_k[None, :] < K)
        if ACT == _ACT_SILU_MUL:
            # SwiGLU fused into the load: the up stage wrote [gate | up] rows, so the activation never
            # makes a round trip through memory.
            gate = tl.load(a_rows_ptr[:, None] + offs_k[None, :], mask=a_mask, other=0.0).to(tl.float32)
            up = tl.load(a_rows_ptr[:, None] + K + offs_k[None, :], mask=a_mask, other=0.0).to(tl.float32)
            a = (gate * tl.sigmoid(gate) * up).to(a_ptr.dtype.element_ty)
        else:
            a = tl.load(a_rows_ptr[:, None] + offs_k[None, :], mask=a_mask, other=0.0)

        if BITS == 3:  # low 2-bit plane, then the high-bit plane further along the same row
            q = _unpack_plane(w_rows, n_mask, k0, plane0_words, 2, BLOCK_N, BLOCK_K)
            q |= _unpack_plane(w_rows + plane0_words, n_mask, k0, row_words - plane0_words, 1, BLOCK_N,
                               BLOCK_K) << 2
        else:
            q = _unpack_plane(w_rows, n_mask, k0, row_words, BITS, BLOCK_N, BLOCK_K)

        g = k0 // group_size  # one group per tile (BLOCK_K divides group_size)
        s = tl.load(s_rows + g, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_rows + g, mask=n_mask, other=0.0).to(tl.float32)
        if USE_DOT and DOT_FP32:
            # "ieee": compiled Triton's fp32 dot defaults to TF32 (10-bit mantissa), 1e-3 off on a GPU
            p = tl.dot(a.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")
        elif USE_DOT:
            # Codes < 256 are exact in fp16 and bf16, so the tensor cores see the integers themselves.
            p = tl.dot(a, tl.trans(q.to(a.dtype)))
        else:
            # M = 1..4: a broadcast multiply and a row sum; no tensor-core tile to pad to 16 rows.
            p = tl.sum(a.to(tl.float32)[:, None, :] * q.to(tl.float32)[None, :, :], axis=2)
        a_sum = tl.sum(a.to(tl.float32), axis=1)
        acc += (p - a_sum[:, None] * z[None, :]) * s[None, :]

    if HAS_BIAS and pid_k == 0:  # split K: the first split adds the bias
        acc += tl.load(bias_ptr + expert_slot * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if MODE == _MOE_DOWN:  # routing weight of each (token, k) assignment, before the sum over k
        acc *= tl.load(route_w_ptr + o_rows, mask=m_mask, other=0.0).to(tl.float32)[:, None]
    o_ptrs = out_ptr + o_rows.to(tl.int64)[:, None] * stride_om + out_col0 + offs_n[None, :]
    if ATOMIC_OUT:  # split K: the splits' partial sums meet in a zeroed fp32 output
        tl.atomic_add(o_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :], sem="relaxed")
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def block_k_for(group_size: int, in_features: int, block_k: int) -> int:
    """The largest ``BLOCK_K <= block_k`` (a power of two, >= 32) that keeps each tile inside one group."""
    if group_size >= in_features:  # one group per row: any tile does
        return block_k
    bk = block_k
    while bk > 32 and group_size % bk:
        bk //= 2
    if group_size % bk:
        raise ValueError(f"the kernels need a group size that is a multiple of 32 (or one group per row), "
                         f"not {group_size}")
    return bk


def k_splits(config: dict, group_size: int, in_features: int) -> tuple[int, int]:
    """(splits, columns per split) for ``config["SPLIT_K"]``: each split a whole number of K tiles.

    Splitting K multiplies the programs of a skinny product (decode reads a few thousand weight
    rows: too few row tiles to keep every SM's loads in flight); the splits' partial sums are added
    atomically into a zeroed fp32 output, so ``splits > 1`` needs one.
    """
    bk = block_k_for(group_size, in_features, config["BLOCK_K"])
    tiles = triton.cdiv(in_features, bk)
    per = triton.cdiv(tiles, max(1, min(config.get("SPLIT_K", 1), tiles))) * bk
    return triton.cdiv(in_features, per), per


def launch(a: torch.Tensor, w: PackedWeight, out: torch.Tensor, *, M: int, grid_m: int, mode: int = DENSE,
           act: int = ACT_NONE, bias: torch.Tensor | None = None, sorted_ids=None, block_expert=None, slots=None,
           route_w=None, num_experts: int = 0, top_k: int = 1, num_slots: int = 1, config: dict) -> None:
    """Launch `_qmm_kernel` for one (stacked) packed weight; shared by `qmm` and `fused_moe`."""
    N, K = w.out_features, w.in_features
    G = w.scales.shape[-1]
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    bk = block_k_for(w.group_size, K, config["BLOCK_K"])
    splits, per_split = k_splits(config, w.group_size, K)
    if splits > 1 and out.dtype != torch.float32:
        raise ValueError("split-K launches add into a zeroed fp32 output")
    stacked = w.qweight.dim() == 3
    dummy = out  # pointer arguments a mode does not read
    grid = (grid_m, triton.cdiv(N, bn), splits)
    _qmm_kernel[grid](
        a, w.qweight, w.scales, w.zeros, bias if bias is not None else dummy, out,
        sorted_ids if sorted_ids is not None else dummy, block_expert if block_expert is not None else dummy,
        slots if slots is not None else dummy, route_w if route_w is not None else dummy,
        M, N, K, G, w.group_size, w.qweight.shape[-1], plane_words(K, 2) if w.bits == 3 else 0,
        a.stride(0), out.stride(0),
        w.qweight[0].numel() if stacked else 0, w.scales[0].numel() if stacked else 0,
        num_experts, top_k, per_split,
        BITS=w.bits, MODE=mode, ACT=act, NUM_SLOTS=num_slots, HAS_BIAS=bias is not None,
        USE_DOT=bm >= 16, DOT_FP32=INTERPRET or a.dtype == torch.float32, ATOMIC_OUT=splits > 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3),
    )


def qmm(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """``x [M, K] @ dequantize(w).T (+ bias)`` on the packed codes, in ``x``'s dtype (Triton)."""
    from paretoq.kernels.configs import qmm_config

    M = x.shape[0]
    x = x.contiguous()
    config = config or qmm_config(M, w.out_features, w.in_features, w.bits, x.device)
    if k_splits(config, w.group_size, w.in_features)[0] > 1:
        out = torch.zeros(M, w.out_features, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(M, w.out_features, dtype=x.dtype, device=x.device)
    launch(x, w, out, M=M, grid_m=triton.cdiv(M, config["BLOCK_M"]), bias=bias, config=config)
    return out.to(x.dtype)


def qmm_reference(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None,
                  config: dict | None = None) -> torch.Tensor:
    """The torch path (CPU runtime and test reference): dequantize per group, then matmul."""
    y = x @ dequantize(w, x.dtype).T
    return y if bias is None else y + bias.to(y.dtype)
