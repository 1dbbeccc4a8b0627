"""Why is the M = 1 kernel far from the copy bandwidth? A sweep of launch configs of paretoq's
`_qmm_kernel` beside a variant that never reshapes the unpacked codes (the codes stay
``[BLOCK_N, WORDS, VALUES_PER_WORD]`` and the activations are read in the same shape), timed side by
side on one GPU. Prints one line per (kernel, bits, shape, config): median microseconds and the
fraction of the measured copy bandwidth.

    python studies/gpu/gemv_variants.py          # on a CUDA machine
    TRITON_INTERPRET=1 python studies/gpu/gemv_variants.py --check   # the variant's correctness on CPU
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import triton
import triton.language as tl

from paretoq.kernels.qmm import qmm, qmm_reference


@triton.jit
def _gemv_3d(a_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, K, G, group_size, row_words,
             BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``out[n] = sum_k a[k] * s[n, g] * (q[n, k] - z[n, g])`` for one-plane widths (2, 4, 8)."""
    VPW: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // VPW
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64) * row_words
    shifts = tl.arange(0, VPW) * BITS
    offs_w = tl.arange(0, WORDS)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        words = tl.load(w_rows[:, None] + (k0 // VPW + offs_w)[None, :], mask=n_mask[:, None], other=0)
        q = ((words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)).to(tl.float32)
        a = tl.load(a_ptr + k0 + offs_w[:, None] * VPW + tl.arange(0, VPW)[None, :]).to(tl.float32)
        p = tl.sum(tl.sum(q * a[None, :, :], axis=2), axis=1)
        g = k0 // group_size
        s = tl.load(s_ptr + offs_n * G + g, mask=n_mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n * G + g, mask=n_mask, other=0.0).to(tl.float32)
        acc += (p - tl.sum(a) * z) * s
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def gemv_3d(x: torch.Tensor, w, config: dict) -> torch.Tensor:
    N, K = w.out_features, w.in_features
    out = torch.empty(1, N, dtype=x.dtype, device=x.device)
    bk = min(config["BLOCK_K"], w.group_size)
    _gemv_3d[(triton.cdiv(N, config["BLOCK_N"]),)](
        x, w.qweight, w.scales, w.zeros, out, N, K, w.scales.shape[-1], w.group_size, w.qweight.shape[-1],
        BITS=w.bits, BLOCK_N=config["BLOCK_N"], BLOCK_K=bk, num_warps=config["num_warps"],
        num_stages=config["num_stages"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="correctness only (CPU interpreter works)")
    args = ap.parse_args()
    from paretoq.kernels.bench import _bench, copy_bandwidth, random_packed

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.check:
        for bits in (2, 4, 8):
            w = random_packed(48, 256, bits, device=device)
            x = torch.randn(1, 256, device=device)
            cfg = {"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 1}
            err = ((gemv_3d(x, w, cfg) - qmm_reference(x, w)).norm() / qmm_reference(x, w).norm()).item()
            print(f"bits {bits}: relative error {err:.1e}")
            assert err < 1e-5
        return 0
    copy_gbs = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  copy {copy_gbs:.0f} GB/s  triton {triton.__version__}")
    grid = [dict(BLOCK_N=bn, BLOCK_K=128, num_warps=nw, num_stages=st)
            for bn, nw, st in itertools.product((8, 16, 32, 64, 128), (2, 4, 8), (3,))]
    for (N, K), bits in itertools.product(((14336, 4096), (4096, 14336)), (4, 2)):
        w = random_packed(N, K, bits)
        x = torch.randn(1, K, device="cuda", dtype=torch.float16)
        want = qmm_reference(x, w).float()
        nbytes = w.qweight.numel() * 4 + w.scales.numel() * 4
        best = {}
        for name, fn in (("qmm", lambda c: qmm(x, w, config={**c, "BLOCK_M": 1})), ("gemv_3d", lambda c: gemv_3d(x, w, c))):
            for c in grid:
                try:
                    got = fn(c).float()
                    err = ((got - want).norm() / want.norm()).item()
                    us = _bench(lambda: fn(c))
                except Exception as e:  # a config that does not compile (registers, shared memory)
                    print(f"{name} b{bits} {N}x{K} {c}: {type(e).__name__}", flush=True)
                    continue
                frac = nbytes / us / 1e3 / copy_gbs
                if name not in best or us < best[name][0]:
                    best[name] = (us, frac, c, err)
                print(f"{name:8s} b{bits} {N:5d}x{K:5d} BN{c['BLOCK_N']:<4d} w{c['num_warps']} s{c['num_stages']}  "
                      f"{us:8.1f} us  {frac:6.1%} of copy  err {err:.1e}", flush=True)
        for name, (us, frac, c, err) in best.items():
            print(f"BEST {name:8s} b{bits} {N}x{K}: {us:.1f} us {frac:.1%} of copy {c} err {err:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
