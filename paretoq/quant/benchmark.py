"""GPTQ throughput, a layer's experts batched vs one at a time.

    python -m paretoq.quant.benchmark --device cuda --shape mixtral        # H100: 8 x 14336 x 4096
    python -m paretoq.quant.benchmark --device cpu --shape small           # what a laptop can run

Random weights and random positive-definite Hessians (low-rank plus diagonal, as real ones are);
prints the median of ``--reps`` runs and input columns quantized per second.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from paretoq.quant.gptq import gptq
from paretoq.quant.quantizer import GRIDS, QuantSettings

# (experts, out, in): Mixtral-8x7B's gate/up projections are 14336 x 4096 ([out, in]), down 4096 x 14336.
SHAPES = {"mixtral": (8, 14336, 4096), "mixtral-down": (8, 4096, 14336), "small": (8, 512, 512)}


def random_hessians(E: int, n: int, device: str, rank: int = 256) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(0)
    A = torch.randn(E, n, rank, device=device, generator=g) / rank**0.5
    return A @ A.transpose(1, 2) + 0.01 * torch.eye(n, device=device)


def _time(fn, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--grid", choices=GRIDS, default=QuantSettings.grid)
    args = p.parse_args(argv)
    E, out, n = SHAPES[args.shape]
    W = torch.randn(E, out, n, device=args.device)
    H = random_hessians(E, n, args.device)
    s = QuantSettings(group_size=args.group_size, grid=args.grid)
    gptq(W[:1, :, :256], H[:1, :256, :256], args.bits, s)  # warm-up (kernels, allocator)
    batched = [_time(lambda: gptq(W, H, args.bits, s), args.device) for _ in range(args.reps)]
    looped = [_time(lambda: [gptq(W[e], H[e], args.bits, s) for e in range(E)], args.device) for _ in range(args.reps)]
    b, lo = statistics.median(batched), statistics.median(looped)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"GPTQ {args.bits}-bit, {E} experts of [{out}, {n}], group {args.group_size}, grid {args.grid}, on {name}")
    print(f"  batched : {b:8.3f} s median of {[round(x, 3) for x in batched]}  {E * n / b:10.0f} columns/s")
    print(f"  looped  : {lo:8.3f} s median of {[round(x, 3) for x in looped]}  {E * n / lo:10.0f} columns/s")
    print(f"  batched is {lo / b:.2f}x the per-expert loop")


if __name__ == "__main__":
    main()
