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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agreement import CTX, kl_by_position, llama_chunks, llama_tokens  # noqa: E402

from paretoq.evaluate import Assembler, _logprobs  # noqa: E402
from paretoq.export.ggml_activations import rounded_linear_inputs, rounding_for  # noqa: E402
from paretoq.export.gguf_read import open_gguf  # noqa: E402
from paretoq.export.llamacpp import gguf_names  # noqa: E402
from paretoq.walk import open_model  # noqa: E402


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
        with Assembler(sm.adapter, weight_of).apply(bits):
            plain = kl_by_position(sm.model, chunks, ref)[:, first:].mean().item()
            weights = []  # (weight, how ggml rounds its input); kv_b split: other inputs in llama.cpp
            for c in sm.adapter.components:
                name = f"{gguf_names(c)[0]}.weight"
                if name in g.tensors:
                    weights.append((sm.adapter.weight(c.key), rounding_for(g.tensors[name].tensor_type.name)))
            out = g.tensors.get("output.weight")
            if out is not None:
                weights.append((sm.model.lm_head.weight, rounding_for(out.tensor_type.name)))
            with rounded_linear_inputs(weights):
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
