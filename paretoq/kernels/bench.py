"""`paretoq bench`: the kernels against the memory-bandwidth limit, cuBLAS fp16 and torch's int4 kernel.

Method (see docs/benchmarks.md): CUDA-event timings through ``triton.testing.do_bench`` (warm-up,
then the median of many runs, the L2 cache flushed by writing 256 MB before each run); the
device copy bandwidth is measured in the same run (a 1 GiB device-to-device copy, bytes read plus
bytes written over time). Effective bandwidth counts the bytes a kernel must read: packed words,
scales and zeros (activations and outputs are under 0.1% at M = 1 and are left out). Weights are
random words (every bit pattern is a valid code) with random scales: never zeros. Each kernel is
checked against its torch reference before it is timed.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from paretoq.errors import ParetoqError

# [out, in] of a routed expert's gate/up (I x H) and down (H x I) projections.
SHAPES = {
    "mixtral": {"hidden": 4096, "intermediate": 14336, "experts": 8, "top_k": 2},  # Mixtral-8x7B
    "qwen-moe": {"hidden": 2048, "intermediate": 1408, "experts": 60, "top_k": 4},  # Qwen1.5-MoE-A2.7B
    "deepseek": {"hidden": 7168, "intermediate": 2048, "experts": 256, "top_k": 8},  # DeepSeek-V3
}
GROUP = 128


@dataclass
class Row:
    kernel: str
    bits: int | str
    M: int
    N: int
    K: int
    us: float
    gbs: float | None = None  # effective GB/s of the bytes counted for this row
    of_copy: float | None = None  # gbs / measured copy bandwidth
    note: str = ""


def _bench(fn) -> float:
    """Median microseconds (CUDA events, L2 flushed before each run)."""
    import triton

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, GB/s counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / _bench(lambda: dst.copy_(src)) / 1e3


def random_packed(N: int, K: int, bits: int, device="cuda", copies: int = 1):
    from paretoq.kernels.layout import PackedWeight, row_words

    g = torch.Generator(device=device).manual_seed(bits * 7 + N + K)
    shape = (copies, N, row_words(K, bits)) if copies > 1 else (N, row_words(K, bits))
    words = torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, device=device, generator=g)
    G = K // GROUP
    sshape = (*shape[:-1], G)
    scales = (torch.rand(sshape, device=device, generator=g) * 0.02 + 0.001).half()
    zeros = torch.randint(0, 2**bits, sshape, device=device, generator=g).half()
    return PackedWeight(words, scales, zeros, bits, K, GROUP)


def _check(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = 1e-2) -> None:
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    if not err < tol:  # NaN fails too
        raise RuntimeError(f"{what}: relative error {err:.2e} against the torch reference; not timing a wrong kernel")


def bench_qmm(N: int, K: int, ms: list[int], copy_gbs: float) -> list[Row]:
    from paretoq.kernels.qmm import qmm, qmm_reference

    rows = []
    for bits in (2, 3, 4, 8):
        w = random_packed(N, K, bits)
        x1 = torch.randn(1, K, device="cuda", dtype=torch.float16)
        _check(qmm(x1, w), qmm_reference(x1, w), f"qmm {bits}-bit {N}x{K}")
        nbytes = w.nbytes()
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            us = _bench(lambda: qmm(x, w))
            gbs = nbytes / us / 1e3
            rows.append(Row("paretoq qmm", bits, M, N, K, us, gbs, gbs / copy_gbs))
        del w
    W = torch.randn(N, K, device="cuda", dtype=torch.float16)
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        us = _bench(lambda: x @ W.T)
        gbs = W.numel() * 2 / us / 1e3
        rows.append(Row("torch.matmul fp16 (cuBLAS)", 16, M, N, K, us, gbs, gbs / copy_gbs))
    del W
    rows += bench_torch_int4(N, K, ms, copy_gbs)
    return rows


def bench_torch_int4(N: int, K: int, ms: list[int], copy_gbs: float) -> list[Row]:
    """torch's tinygemm int4 kernel (`aten._weight_int4pack_mm`, group 128, bf16 activations)."""
    try:
        codes = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
        packed = torch.ops.aten._convert_weight_to_int4pack(codes, 8)
        sz = torch.rand(K // GROUP, N, 2, device="cuda", dtype=torch.bfloat16) * 0.02
        nbytes = N * K // 2 + sz.numel() * 2
        rows = []
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            us = _bench(lambda: torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, sz))
            gbs = nbytes / us / 1e3
            rows.append(Row("torch _weight_int4pack_mm", 4, M, N, K, us, gbs, gbs / copy_gbs))
        return rows
    except Exception as exc:  # torch builds without the kernel for this GPU
        return [Row("torch _weight_int4pack_mm", 4, 0, N, K, float("nan"), note=f"unavailable: {exc}".splitlines()[0])]


def bench_moe(shape: dict, copy_gbs: float) -> list[Row]:
    """A mixed 2/3/4-bit layer and a 4-bit layer at M = 1, and transformers' grouped_mm in bf16."""
    from paretoq.kernels.moe import PackedExperts, fused_moe, fused_moe_reference

    H, I, E, top_k = shape["hidden"], shape["intermediate"], shape["experts"], shape["top_k"]
    E = min(E, 8)  # 8 experts suffice at M = 1 (only top_k are read) and keep the bf16 layer in memory
    top_k = min(top_k, 2)
    rows = []
    ids = torch.arange(top_k, device="cuda").reshape(1, top_k)  # experts 0 and 1: a 2-bit and a 3-bit expert
    wts = torch.full((1, top_k), 1.0 / top_k, device="cuda")
    x = torch.randn(1, H, device="cuda", dtype=torch.float16)
    for name, widths in (("mixed 2/3/4-bit", (2, 3, 4)), ("4-bit", (4,))):
        weights = {}
        for e in range(E):
            b = widths[e % len(widths)]
            for p in ("gate_proj", "up_proj"):
                weights[(e, p)] = random_packed(I, H, b)
            weights[(e, "down_proj")] = random_packed(H, I, b)
        packed = PackedExperts.build(weights, E).to("cuda")
        _check(fused_moe(x, ids, wts, packed), fused_moe_reference(x, ids, wts, packed), f"fused MoE {name}")
        nbytes = sum(packed.expert_nbytes(e) for e in range(top_k))
        us = _bench(lambda: fused_moe(x, ids, wts, packed))
        gbs = nbytes / us / 1e3
        rows.append(Row(f"paretoq fused MoE, {E} experts top-{top_k}", name, 1, H, I, us, gbs, gbs / copy_gbs,
                        f"bits of experts read: {[widths[e % len(widths)] for e in range(top_k)]}"))
        del packed, weights
    rows.append(bench_grouped_mm(H, I, E, top_k, x, ids, wts, copy_gbs))
    return rows


def bench_grouped_mm(H, I, E, top_k, x, ids, wts, copy_gbs) -> Row:
    """transformers' default experts backend on a Mixtral Experts module in bf16."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts

        cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=top_k)
        cfg._experts_implementation = "grouped_mm"
        experts = MixtralExperts(cfg).to("cuda", torch.bfloat16)
        with torch.no_grad():
            for p in experts.parameters():
                p.normal_(0, 0.02)
            xb = x.bfloat16()
            us = _bench(lambda: experts(xb, ids, wts.bfloat16()))
        nbytes = top_k * 3 * H * I * 2
        gbs = nbytes / us / 1e3
        return Row(f"transformers grouped_mm bf16, {E} experts top-{top_k}", 16, 1, H, I, us, gbs, gbs / copy_gbs)
    except Exception as exc:
        return Row("transformers grouped_mm bf16", 16, 1, H, I, float("nan"), note=f"failed: {exc}".splitlines()[0])


def bench_decode(checkpoint: str, tokens: int = 64) -> list[Row]:
    """End-to-end greedy decode: the packed checkpoint on the Triton kernels vs its fp16 model."""
    import paretoq
    from paretoq.runtime.generate import greedy
    from paretoq.runtime.patch import load_runtime

    prompt = "The"
    rows = []
    for label in ("quantized (Triton)", "fp16 (dequantized weights, grouped_mm)"):
        if label.startswith("quantized"):
            loaded, _ = load_runtime(checkpoint, torch.float16, "cuda", "triton")
        else:
            loaded = paretoq.load_quantized(checkpoint, dtype=torch.float16, device="cuda")
            if hasattr(loaded.model, "set_experts_implementation"):
                loaded.model.set_experts_implementation("grouped_mm")
        ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids.to("cuda")
        greedy(loaded.model, ids, 8)  # warm-up: compilation, allocator
        runs = [greedy(loaded.model, ids, tokens)[1] for _ in range(3)]
        s = statistics.median(runs)
        rows.append(Row(f"decode {label}", "", 1, 0, 0, s / tokens * 1e6, note=f"{tokens / s:.1f} tokens/s"))
        del loaded
        torch.cuda.empty_cache()
    return rows


def tune_grid(M: int, K: int) -> list[dict]:
    """Launch configs worth timing at M rows: 6-18 per M (the first H200 run's 180-config grid per
    (bits, M) ran past its step limit). BLOCK_K 128 is the group size; 3 stages and 2-4 warps were
    the sweeps' winners (docs/benchmarks.md); decode also tries splitting K."""
    if M == 1:
        return [{"BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": 128, "num_warps": w, "num_stages": 3, "SPLIT_K": sk}
                for bn in (8, 16, 32) for w in (2, 4) for sk in (1, 4, 16) if K // sk >= 512]
    bms = [16] if M <= 16 else [32, 64] if M <= 64 else [64, 128]
    return [{"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128 if bm < 64 else 64, "num_warps": w, "num_stages": 3}
            for bm in bms for bn in (32, 64, 128) for w in (4, 8)]


def tune_qmm(N: int, K: int, ms: list[int]) -> dict:
    """Try a grid of launch configs per (bits, M) and keep the fastest (saved by `run_bench`)."""
    from paretoq.kernels.configs import key
    from paretoq.kernels.qmm import qmm

    found = {}
    for bits in (2, 3, 4, 8):
        w = random_packed(N, K, bits)
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            best = None
            for cfg in tune_grid(M, K):
                try:
                    us = _bench(lambda: qmm(x, w, config=cfg))
                except Exception:  # out of shared memory or registers
                    continue
                if best is None or us < best[0]:
                    best = (us, cfg)
            if best:
                found[key("qmm", bits, M, N, K)] = best[1]
    return found


def targets(rows: list[Row], H: int, I: int) -> str:
    """The issue's acceptance targets, read off the rows (M = 1 unless stated)."""
    def get(kernel, bits, M, N, K):
        return next((r for r in rows if r.kernel.startswith(kernel) and r.bits == bits and r.M == M
                     and r.N == N and r.K == K), None)

    lines = ["", "", "targets:"]
    for N, K in ((I, H), (H, I)):
        for bits, floor in ((2, 0.55), (3, 0.55), (4, 0.70), (8, 0.75)):
            r1, r16 = get("paretoq qmm", bits, 1, N, K), get("paretoq qmm", bits, 16, N, K)
            if r1 is None:
                continue
            lines.append(f"  {bits}-bit {N}x{K} M=1: {r1.of_copy:.1%} of copy (target {floor:.0%}) "
                         f"{'met' if r1.of_copy >= floor else 'MISSED'}")
            if r16 is not None:
                ratio = r16.us / r1.us
                lines.append(f"  {bits}-bit {N}x{K} M=16 / M=1 time: {ratio:.2f}x (target <= 1.3x) "
                             f"{'met' if ratio <= 1.3 else 'MISSED'}")
        q4, i4 = get("paretoq qmm", 4, 1, N, K), get("torch _weight_int4pack_mm", 4, 1, N, K)
        if q4 and i4 and i4.us == i4.us:
            sp = i4.us / q4.us
            lines.append(f"  4-bit {N}x{K} M=1 vs torch int4: {sp:.2f}x faster (target >= 1.5x) "
                         f"{'met' if sp >= 1.5 else 'MISSED'}")
    mixed = next((r for r in rows if r.kernel.startswith("paretoq fused MoE") and r.bits == "mixed 2/3/4-bit"), None)
    if mixed:
        lines.append(f"  mixed 2/3/4-bit MoE layer M=1: {mixed.of_copy:.1%} of copy on the experts read "
                     f"(target 60%) {'met' if mixed.of_copy >= 0.6 else 'MISSED'}")
    q4 = next((r for r in rows if r.kernel.startswith("paretoq fused MoE") and r.bits == "4-bit"), None)
    gm = next((r for r in rows if r.kernel.startswith("transformers grouped_mm")), None)
    if q4 and gm and gm.us == gm.us:
        sp = gm.us / q4.us
        lines.append(f"  4-bit MoE layer M=1 vs grouped_mm bf16: {sp:.2f}x faster (target >= 5x) "
                     f"{'met' if sp >= 5 else 'MISSED'}")
    return "\n".join(lines)


def format_rows(rows: list[Row], header: str) -> str:
    lines = [header, "", f"{'kernel':48s} {'bits':>15s} {'M':>4s} {'N':>6s} {'K':>6s} {'us':>9s} {'GB/s':>8s} "
             f"{'of copy':>8s}  note"]
    for r in rows:
        gbs = f"{r.gbs:8.0f}" if r.gbs is not None else f"{'':8s}"
        frac = f"{r.of_copy:8.1%}" if r.of_copy is not None else f"{'':8s}"
        lines.append(f"{r.kernel:48s} {str(r.bits):>15s} {r.M:4d} {r.N:6d} {r.K:6d} {r.us:9.1f} {gbs} {frac}  {r.note}")
    return "\n".join(lines)


def run_bench(shapes: str = "mixtral", checkpoint: str | None = None, ms: str | list[int] = "1,4,16,64,256",
              tune: bool = False, out: Path | None = None) -> str:
    if shapes not in SHAPES:
        raise ParetoqError(f"unknown --shapes {shapes!r}; pass one of {', '.join(SHAPES)}")
    try:
        ms = [int(m) for m in ms.split(",")] if isinstance(ms, str) else list(ms)
    except ValueError:
        raise ParetoqError(f"--m {ms!r} is not a comma-separated list of token counts, e.g. 1,4,16") from None
    if not ms or min(ms) < 1:
        raise ParetoqError("--m needs token counts of at least 1, e.g. 1,4,16")
    if not torch.cuda.is_available():
        raise ParetoqError("`paretoq bench` times CUDA kernels and torch sees no CUDA device; run it on a GPU "
                           "(the kernels' correctness tests run on CPU: python -m pytest tests/test_qmm.py)")
    from paretoq.kernels.configs import device_name, save_user_table

    shape = SHAPES[shapes]
    H, I = shape["hidden"], shape["intermediate"]
    copy_gbs = copy_bandwidth()
    saved = ""
    if tune:
        table = {**tune_qmm(I, H, ms), **tune_qmm(H, I, ms)}
        saved = f"\ntuned configs saved to {save_user_table(device_name('cuda'), table)}"
    rows = bench_qmm(I, H, ms, copy_gbs) + bench_qmm(H, I, ms, copy_gbs) + bench_moe(shape, copy_gbs)
    if checkpoint:
        rows += bench_decode(checkpoint)
    import triton

    header = (f"paretoq bench --shapes {shapes} on {torch.cuda.get_device_name()} (torch {torch.__version__}, "
              f"triton {triton.__version__}); group {GROUP}, fp16 activations (bf16 for torch int4 and grouped_mm); "
              f"device copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    if out is not None:
        from paretoq.cache import atomic_write_text

        atomic_write_text(Path(out), json.dumps({"header": header, "copy_gbs": copy_gbs,
                                                 "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    return format_rows(rows, header) + targets(rows, H, I) + saved
