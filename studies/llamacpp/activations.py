"""What is left between paretoq's KL and llama-perplexity's: llama.cpp's 8-bit activations.

    python studies/llamacpp/activations.py LLAMA_CPP_DIR WORK     # WORK: run.py's --work (GGUFs, logs)

On the CPU, ggml multiplies a quantized weight with activations quantized too, to the weight
type's ``vec_dot_type`` (ggml-cpu.c): q8_K (blocks of 256, a float scale) for K-quants, q8_0 or
q8_1 (blocks of 32, an fp16 scale) for the legacy types. paretoq computes with the dequantized
weights in float32. This script scores llama-perplexity's own tokens and positions (as
agreement.py) with paretoq's model, first as it is, then with each matrix product's input rounded
as ggml rounds it for that weight's type in the file, and prints both beside llama-perplexity's
mean KLD from run.py's logs.
"""

from __future__ import annotations

import json
import re
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agreement import CTX, kl_by_position, llama_chunks, llama_tokens  # noqa: E402

from paretoq.eval_plans import outside_weights  # noqa: E402
from paretoq.evaluate import Assembler, _logprobs  # noqa: E402
from paretoq.export.gguf_read import open_gguf  # noqa: E402
from paretoq.export.llamacpp import gguf_names  # noqa: E402
from paretoq.walk import open_model  # noqa: E402

# ggml-cpu.c's vec_dot_type per weight type: (block, scale stored in fp16)
Q8_K, Q8_0 = (256, False), (32, True)
LEGACY = {"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl"}


def activation_rounding(ggml_type: str):
    t = ggml_type.lower()
    if t in ("f32", "f16", "bf16"):
        return None
    return Q8_0 if t in LEGACY else Q8_K


def round_like_ggml(x: torch.Tensor, block: int, fp16_scale: bool) -> torch.Tensor:
    """``x`` as ggml's q8 quantizers store it: per block of the last dimension, a scale amax/127 and
    int8 codes rounded to nearest."""
    shape = x.shape
    xb = x.float().reshape(-1, shape[-1] // block, block)
    d = xb.abs().amax(-1, keepdim=True) / 127
    if fp16_scale:
        d = d.half().float()
    q = torch.where(d > 0, torch.round(xb / torch.where(d > 0, d, 1)).clamp(-127, 127), 0)
    return (q * d).reshape(shape).to(x.dtype)


@contextmanager
def ggml_activations(rounding: dict[int, tuple[int, bool]]):
    """Every F.linear whose weight lives in a storage of ``rounding`` gets its input rounded so."""
    linear = F.linear

    def patched(x, w, b=None):
        r = rounding.get(w.untyped_storage().data_ptr())
        if r is not None and x.shape[-1] % r[0] == 0:
            x = round_like_ggml(x, *r)
        return linear(x, w, b)

    F.linear = patched
    try:
        yield
    finally:
        F.linear = linear


def main() -> int:
    llama, work = Path(sys.argv[1]), Path(sys.argv[2])
    sm = open_model("demo")
    sm.materialize_all()
    ids = llama_tokens(llama, work / "model-f32.gguf", work / "eval.txt")
    chunks = llama_chunks(ids, None)
    ref = [_logprobs(sm.model, b) for b in chunks.split(8)]
    first = CTX // 2
    rows = []
    for path in sorted(work.glob("*.gguf")):
        if path.name in ("model-f32.gguf", "imatrix.gguf"):
            continue
        found = re.search(r"Mean\s+KLD:\s+(\S+)", (work / f"{path.stem}.kld.log").read_text())
        g = open_gguf(path, sm.adapter, sm.model.config)
        weight_of, bits = g.as_plan(sm.adapter)
        with outside_weights(sm.model, g.outside()), Assembler(sm.adapter, weight_of).apply(bits):
            plain = kl_by_position(sm.model, chunks, ref)[:, first:].mean().item()
            rounding = {}
            for c in sm.adapter.components:
                name = f"{gguf_names(c)[0]}.weight"
                if name not in g.tensors:  # kv_b split: its products take other inputs in llama.cpp
                    continue
                r = activation_rounding(g.tensors[name].tensor_type.name)
                ptr = sm.adapter.weight(c.key).untyped_storage().data_ptr()  # experts: the stacked tensor's
                if r is not None and (ptr not in rounding or r[0] > rounding[ptr][0]):
                    rounding[ptr] = r  # a fused gate_up of two types: the coarser
            out = g.tensors.get("output.weight")
            if out is not None and activation_rounding(out.tensor_type.name):
                rounding[sm.model.lm_head.weight.untyped_storage().data_ptr()] = activation_rounding(
                    out.tensor_type.name)
            with ggml_activations(rounding):
                rounded = kl_by_position(sm.model, chunks, ref)[:, first:].mean().item()
        rows.append({"gguf": path.name, "llama_kld": float(found.group(1)), "paretoq": plain,
                     "paretoq_ggml_activations": rounded})
    print(json.dumps(rows, indent=1))
    print("| GGUF | llama-perplexity KLD | paretoq (ratio) | paretoq, activations rounded as ggml's CPU does (ratio) |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        k = r["llama_kld"]
        print(f"| {r['gguf']} | {k:.4g} | {r['paretoq']:.4g} ({r['paretoq'] / k:.3f}x) | "
              f"{r['paretoq_ggml_activations']:.4g} ({r['paretoq_ggml_activations'] / k:.3f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
