"""`paretoq eval --gguf` beside llama-perplexity's mean KLD, with and without llama.cpp's 8-bit
activations (`--gguf-activations ggml`, the default, and `exact`).

    PARETOQ_CACHE=... python studies/llamacpp/gguf_eval.py WORK [--out studies/llamacpp]

WORK is run.py's work directory: its GGUFs and the ``<name>.kld.log`` of each (llama-perplexity
``--kl-divergence`` against the f32 GGUF on the 32 eval windows of seed 0, decoded). paretoq scores
the same files on its own windows (the same 32, seed 0), as a user would run it. Writes
``gguf_eval.json`` and ``gguf_eval.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from paretoq.cache import atomic_write_text
from paretoq.eval_plans import eval_plans

SKIP = ("model-f32.gguf", "imatrix.gguf")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("work", type=Path)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    a = p.parse_args()
    files = [f for f in sorted(a.work.glob("*.gguf")) if f.name not in SKIP and (a.work / f"{f.stem}.kld.log").is_file()]
    llama = {f.name: float(re.search(r"Mean\s+KLD:\s+(\S+)", (a.work / f"{f.stem}.kld.log").read_text()).group(1))
             for f in files}
    kl = {mode: {p.name: p.result.kl for p in eval_plans(gguf=files, progress=False, gguf_activations=mode).plans}
          for mode in ("exact", "ggml")}
    rows = [{"gguf": f.name, "llama_kld": llama[f.name], "paretoq_exact": kl["exact"][f.name],
             "paretoq_ggml": kl["ggml"][f.name]} for f in files]
    lines = ["| GGUF | llama-perplexity KLD | paretoq eval --gguf, exact (ratio) | paretoq eval --gguf, default: "
             "ggml activations (ratio) |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        k = r["llama_kld"]
        lines.append(f"| {r['gguf']} | {k:.4g} | {r['paretoq_exact']:.4g} ({r['paretoq_exact'] / k:.3f}x) | "
                     f"{r['paretoq_ggml']:.4g} ({r['paretoq_ggml'] / k:.3f}x) |")

    def rank(key):
        return [r["gguf"] for r in sorted(rows, key=lambda r: r[key])]

    for mode in ("exact", "ggml"):
        ratios = [r[f"paretoq_{mode}"] / r["llama_kld"] for r in rows]
        lines.append(f"\n`{mode}`: ratio {min(ratios):.3f}-{max(ratios):.3f}, within 10% on "
                     f"{sum(abs(x - 1) <= 0.1 for x in ratios)} of {len(rows)} files, geometric mean "
                     f"{np.exp(np.mean(np.log(ratios))):.3f}; llama-perplexity's ranking "
                     f"{'kept' if rank(f'paretoq_{mode}') == rank('llama_kld') else 'NOT kept'}.")
    text = "\n".join(lines)
    print(text)
    atomic_write_text(a.out / "gguf_eval.json", json.dumps(rows, indent=1) + "\n")
    atomic_write_text(a.out / "gguf_eval.md", "# paretoq eval --gguf against llama-perplexity (`gguf_eval.py`)\n\n"
                      + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
