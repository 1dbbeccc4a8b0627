"""Decode (M = 1) launch configs with K split over programs (`SPLIT_K`), timed side by side on one
GPU: the dense product at both Mixtral expert shapes (2 and 4 bits) and the fused 4-bit MoE layer.
Prints one line per config (median microseconds, fraction of the measured copy bandwidth) and the
best per case. Each result is checked against the torch reference before it is timed.

    python studies/gpu/split_k.py        # on a CUDA machine (docs/benchmarks.md has the figures)
"""

from __future__ import annotations

import itertools
import sys

import torch
import triton

from paretoq.kernels.bench import _bench, _check, copy_bandwidth, random_packed
from paretoq.kernels.moe import PackedExperts, fused_moe, fused_moe_reference
from paretoq.kernels.qmm import qmm, qmm_reference

H, I = 4096, 14336  # Mixtral-8x7B


def report(case: str, results: list[tuple[float, float, dict]]) -> None:
    us, frac, c = min(results, key=lambda r: r[0])
    print(f"BEST {case}: {us:.1f} us, {frac:.1%} of copy, {c}", flush=True)


def main() -> int:
    global H, I, _bench, copy_bandwidth, random_packed
    device = "cuda"
    if sys.argv[1:] == ["--smoke"]:  # the script's own check on CPU (TRITON_INTERPRET=1): small, untimed
        import time

        H, I, device = 256, 384, "cpu"
        _bench = lambda fn: (lambda t: (fn(), time.perf_counter() - t)[1] * 1e6)(time.perf_counter())  # noqa: E731
        copy_bandwidth = lambda: 1.0  # noqa: E731
        random_packed = (lambda rp: lambda N, K, b: rp(N, K, b, device="cpu"))(random_packed)
    copy_gbs = copy_bandwidth()
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, copy {copy_gbs:.0f} GB/s, triton {triton.__version__}", flush=True)
    grid = [dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=128, num_warps=nw, num_stages=3, SPLIT_K=sk)
            for bn, nw, sk in itertools.product((8, 16, 32), (2, 4), (1, 2, 4, 8, 16))]
    for (N, K), bits in itertools.product(((I, H), (H, I)), (4, 2)):
        w = random_packed(N, K, bits)
        x = torch.randn(1, K, device=device, dtype=torch.float16)
        want = qmm_reference(x, w)
        results = []
        for c in grid:
            _check(qmm(x, w, config=c), want, f"qmm {c}")
            us = _bench(lambda: qmm(x, w, config=c))
            frac = w.nbytes() / us / 1e3 / copy_gbs
            results.append((us, frac, c))
            print(f"qmm b{bits} {N}x{K} BN{c['BLOCK_N']} w{c['num_warps']} split{c['SPLIT_K']}: {us:.1f} us "
                  f"{frac:.1%}", flush=True)
        report(f"qmm b{bits} {N}x{K}", results)

    E, top_k = 8, 2
    weights = {}
    for e in range(E):
        for p in ("gate_proj", "up_proj"):
            weights[(e, p)] = random_packed(I, H, 4)
        weights[(e, "down_proj")] = random_packed(H, I, 4)
    packed = PackedExperts.build(weights, E).to(device)
    ids = torch.arange(top_k, device=device).reshape(1, top_k)
    wts = torch.full((1, top_k), 1.0 / top_k, device=device)
    x = torch.randn(1, H, device=device, dtype=torch.float16)
    want = fused_moe_reference(x, ids, wts, packed)
    nbytes = sum(packed.expert_nbytes(e) for e in range(top_k))
    results = []
    for bn, sk in itertools.product((8, 16, 32), (1, 4, 8, 16)):
        c = dict(BLOCK_M=1, BLOCK_N=bn, BLOCK_K=128, num_warps=2, num_stages=3, SPLIT_K=sk)
        configs = {("up", 4): c, ("down", 4): c}
        _check(fused_moe(x, ids, wts, packed, configs=configs), want, f"fused MoE {c}")
        us = _bench(lambda: fused_moe(x, ids, wts, packed, configs=configs))
        frac = nbytes / us / 1e3 / copy_gbs
        results.append((us, frac, c))
        print(f"fused MoE 4-bit top-2 BN{bn} split{sk}: {us:.1f} us {frac:.1%}", flush=True)
    report("fused MoE 4-bit", results)
    align = _bench(lambda: fused_moe.__globals__["moe_align"](ids, E, 1))
    print(f"moe_align alone: {align:.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
