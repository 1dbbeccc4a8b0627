"""The Triton kernel compiles for real GPUs, checked on a machine without one.

Every other kernel test runs under ``TRITON_INTERPRET=1`` on CPU, and the interpreter accepts code
that the compiler refuses (a plain global int read inside a kernel passed every CPU test and failed
every GPU call, found on the first H200 run). Triton's compiler needs no GPU to lower a kernel to a
cubin, so this test compiles the kernel in a fresh process, without the interpreter, for Hopper
(sm_90) and Ampere (sm_80), in each mode and at the launch configurations `configs.heuristic` picks
for decode, small batches and prefill.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

COMPILE = r"""
import json, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from paretoq.kernels.configs import heuristic
from paretoq.kernels.qmm import _qmm_kernel, ACT_NONE, ACT_SILU_MUL, DENSE, MOE_DOWN, MOE_UP

# Pointer types as `launch` passes them for fp16 activations (int32 packed words, fp32 routing weights).
POINTERS = {"a_ptr": "*fp16", "w_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16", "bias_ptr": "*fp16",
            "out_ptr": "*fp16", "sorted_ptr": "*i32", "block_expert_ptr": "*i32", "slot_ptr": "*i32",
            "route_w_ptr": "*fp32"}
done = []
for arch, mode, act, bits, M, bias, atomic, fp32 in json.loads(sys.argv[1]):
    cfg = heuristic(M, 4096, 4096)
    const = dict(BITS=bits, MODE=mode, ACT=act, NUM_SLOTS=2 if mode == MOE_UP else 1, HAS_BIAS=bias,
                 USE_DOT=cfg["BLOCK_M"] >= 16, DOT_FP32=fp32, ATOMIC_OUT=atomic, BLOCK_M=cfg["BLOCK_M"],
                 BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"])
    names = _qmm_kernel.arg_names
    pointers = {**POINTERS, **({"out_ptr": "*fp32"} if atomic else {}), **({"a_ptr": "*fp32"} if fp32 else {})}
    signature = {n: "constexpr" if n in const else pointers.get(n, "i32") for n in names}
    src = ASTSource(_qmm_kernel, signature, {(i,): const[n] for i, n in enumerate(names) if n in const})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    done.append(len(kernel.asm["cubin"]))
print(json.dumps(done))
"""

DENSE, MOE_UP, MOE_DOWN, ACT_NONE, ACT_SILU_MUL = 0, 1, 2, 0, 1  # checked against the module in the child
CASES = (  # arch, mode, activation, bits, M, bias, split K (atomic fp32 output), fp32 activations
    # dense decode (M = 1, broadcast-and-sum) and small batch (M = 16, tensor-core dot) at every width
    [[90, DENSE, ACT_NONE, bits, M, False, False, False] for bits in (2, 3, 4, 8) for M in (1, 16)]
    # prefill tiles, with a bias; Ampere's lowering of the same kernel
    + [[90, DENSE, ACT_NONE, 3, 256, True, False, False], [80, DENSE, ACT_NONE, 4, 16, False, False, False]]
    # split K at decode, with a bias; fp32 activations take the full-precision (not TF32) dot
    + [[90, DENSE, ACT_NONE, 4, 1, True, True, False], [90, DENSE, ACT_NONE, 4, 16, False, False, True]]
    # the fused MoE's two stages: up/gate, then down with SwiGLU applied while loading
    + [[90, MOE_UP, ACT_NONE, 4, 16, False, False, False], [90, MOE_DOWN, ACT_SILU_MUL, 2, 16, False, False, False],
       [90, MOE_DOWN, ACT_NONE, 3, 64, True, False, False], [90, MOE_DOWN, ACT_SILU_MUL, 4, 1, False, True, False]]
)


def test_kernel_compiles_for_gpus_without_one(tmp_path):
    from paretoq.kernels import qmm

    assert (qmm.DENSE, qmm.MOE_UP, qmm.MOE_DOWN, qmm.ACT_NONE, qmm.ACT_SILU_MUL) == (0, 1, 2, 0, 1)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile, never reuse a binary from an earlier run
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(CASES)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    sizes = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(sizes) == len(CASES) and min(sizes) > 1000  # a cubin per case, not an empty one
