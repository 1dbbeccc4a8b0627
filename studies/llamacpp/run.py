"""llama.cpp's own mixtures against paretoq plans applied by llama-quantize, on one scale (issue 18).

    PARETOQ_CACHE=... python studies/llamacpp/run.py LLAMA_CPP_DIR [--model demo] [--budgets match|2.5,3,...]
                                                     [--ftypes Q2_K,Q3_K_S,Q3_K_M,Q4_K_S,Q4_K_M] [--trials 60]
                                                     [--no-imatrix] [--work /tmp/paretoq-llamacpp] [--out studies/llamacpp]

LLAMA_CPP_DIR is a llama.cpp source tree with ``build/bin/llama-quantize`` and ``llama-perplexity``
built (the sdist of llama-cpp-python carries one under ``vendor/llama.cpp``; docs/benchmarks.md says
how to build it offline). Every GGUF is made by llama.cpp itself, from one f32 GGUF written by its
own converter, with one importance matrix (``paretoq imatrix`` on the search's calibration windows;
``--no-imatrix``: none anywhere):

- llama.cpp's mixtures: ``llama-quantize --imatrix I f32.gguf out.gguf FTYPE``;
- paretoq's: ``paretoq search --target llamacpp --budget B`` (ggml's own types measured at their real
  sizes with the same importance), ``paretoq export --format llamacpp --imatrix I`` (a tensor-type
  file, a base type and the imatrix), then ``llama-quantize --imatrix I --tensor-type-file ... BASE``.

``--budgets match`` (the default) searches at each mixture's own bits per weight over its matrices
(every searched component, token_embd and output), as its file stores them, so each plan takes at
most the mixture's bytes: the search gives token_embd and output their types too, and the base
ftype sets none of them. Each GGUF is
measured twice on the same text, the eval windows of seed 0: by ``paretoq eval --gguf`` (KL and
perplexity), and by llama.cpp's own ``llama-perplexity --kl-divergence`` against the f32 GGUF, over
those windows decoded to text (llama.cpp re-tokenizes it and scores the second half of each
256-token chunk, so its mean KLD is over other positions, computed in other precisions). Writes
result.json and result.md into --out.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

from paretoq.cache import atomic_write_text
from paretoq.eval_plans import eval_plans

HERE = Path(__file__).resolve().parent


def convert(llama: Path, model: Path, out: Path) -> None:
    """llama.cpp's own convert_hf_to_gguf.py, in a subprocess. A tokenizer trained here has no known
    pre-tokenizer hash; byte-level BPE behaves as GPT-2's, so that is what the converter is told."""
    code = f"""
import sys
sys.path[:0] = [{str(llama)!r}, {str(llama / 'gguf-py')!r}]
import conversion.base as base
for cls in [getattr(base, n) for n in dir(base)]:
    if isinstance(cls, type) and "get_vocab_base_pre" in cls.__dict__:
        cls.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", {str(model)!r}, "--outtype", "f32", "--outfile", {str(out)!r}]
convert_hf_to_gguf.main()
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def quantize(llama: Path, src: Path, out: Path, ftype: str, types_file: Path | None = None,
             imatrix: Path | None = None) -> None:
    args = [str(llama / "build" / "bin" / "llama-quantize")]
    args += ["--imatrix", str(imatrix)] if imatrix else []
    args += ["--tensor-type-file", str(types_file)] if types_file else []
    subprocess.run([*args, str(src), str(out), ftype], check=True, capture_output=True)


def eval_text(model: Path, out: Path) -> None:
    """The eval windows of seed 0, decoded, one window per line: the text both tools measure."""
    from transformers import AutoTokenizer

    from paretoq.data import load_token_sets

    tok = AutoTokenizer.from_pretrained(str(model))
    windows = load_token_sets(tok).eval.input_ids
    atomic_write_text(out, "\n".join(tok.decode(w) for w in windows) + "\n")


def llama_kld(llama: Path, f32: Path, ggufs: list[Path], text: Path, work: Path) -> dict[str, float]:
    """llama-perplexity's mean KLD of each GGUF against the f32 one. --no-repack: this build's CPU
    weight repacking aborts on the demo's quantized GGUFs (ecosystem.md)."""
    exe = str(llama / "build" / "bin" / "llama-perplexity")
    common = ["-f", str(text), "-c", "256", "-b", "256", "--no-repack", "-t", "2"]
    base = work / "f32.kld"
    if not base.is_file():
        subprocess.run([exe, "-m", str(f32), *common, "--kl-divergence-base", str(base)], check=True,
                       capture_output=True)
    out = {}
    for g in ggufs:
        log = work / f"{g.stem}.kld.log"
        for _ in range(5):  # its logger thread sometimes loses the last lines at exit, the statistics among them
            with open(log, "w") as f:
                subprocess.run([exe, "-m", str(g), *common, "--kl-divergence-base", str(base), "--kl-divergence"],
                               check=True, stdout=f, stderr=subprocess.STDOUT)
            found = re.search(r"Mean\s+KLD:\s+(\S+)", log.read_text())
            if found is not None:
                out[g.name] = float(found.group(1))
                break
        else:
            raise RuntimeError(f"llama-perplexity printed no mean KLD for {g} in five runs")
    return out


def paretoq(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "paretoq.cli", *args], check=True, capture_output=True,
                          text=True).stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("llama_cpp", type=Path)
    p.add_argument("--model", default="demo")
    p.add_argument("--budgets", default="match")
    p.add_argument("--no-imatrix", action="store_true")
    p.add_argument("--margin", type=float, default=0.0,
                   help="with --budgets match: search this many bits below each mixture (the GGUF can exceed the "
                        "plan where llama-quantize falls back to wider types, e.g. DeepSeek's 32-wide attn_k_b rows)")
    p.add_argument("--ftypes", default="Q2_K,Q3_K_S,Q3_K_M,Q4_K_S,Q4_K_M")
    p.add_argument("--trials", type=int, default=60)
    p.add_argument("--work", type=Path, default=Path("/tmp/paretoq-llamacpp"))
    p.add_argument("--out", type=Path, default=HERE)
    a = p.parse_args()
    from paretoq.models.loading import demo_dir

    model = demo_dir() if a.model == "demo" else Path(a.model)
    a.work.mkdir(parents=True, exist_ok=True)
    f32 = a.work / "model-f32.gguf"
    if not f32.is_file():
        convert(a.llama_cpp, model, f32)
    imatrix = None if a.no_imatrix else a.work / "imatrix.gguf"
    if imatrix is not None and not imatrix.is_file():
        paretoq("imatrix", "--model", str(a.model), "--out", str(imatrix), "--quiet")
    ggufs: dict[str, dict] = {}
    budgets = []
    for ftype in a.ftypes.split(","):
        out = a.work / f"llamacpp-{ftype}.gguf"
        if not out.is_file():
            quantize(a.llama_cpp, f32, out, ftype, imatrix=imatrix)
        ggufs[out.name] = {"source": "llama.cpp", "ftype": ftype}
        if a.budgets == "match":  # the mixture's bits per weight over its matrices, rounded down
            bpw = json.loads(paretoq("eval", "--model", str(a.model), "--gguf", str(out), "--json", "--quiet"))["avg_bits"]
            budgets.append(f"{int((bpw - a.margin) * 1e4) / 1e4:.4f}")
    budgets = budgets if a.budgets == "match" else a.budgets.split(",")
    storage = f"sqlite:///{(a.work / 'study.db').resolve()}"
    for budget in budgets:
        run = a.work / f"search-{budget}"
        if not (run / "plan.json").is_file():
            paretoq("search", "--model", str(a.model), "--target", "llamacpp", "--budget", budget, "--trials",
                    str(a.trials), "--study", f"llamacpp-{budget}", "--storage", storage, "--out", str(run), "--quiet")
        export = a.work / f"export-{budget}"
        said = paretoq("export", "--plan", str(run / "plan.json"), "--format", "llamacpp", "--out", str(export),
                       "--model", str(model), *(["--imatrix", str(imatrix)] if imatrix else []))
        # the export's own next step names the base type (for the tensors no line of the file names)
        base_ftype = next(line for line in said.splitlines() if line.strip().startswith("llama-quantize")).split()[-1]
        out = a.work / f"paretoq-{budget}.gguf"
        quantize(a.llama_cpp, f32, out, base_ftype, export / "tensor-types.txt", imatrix=imatrix)
        ggufs[out.name] = {"source": "paretoq", "budget": float(budget), "base": base_ftype}
    text = a.work / "eval.txt"
    if not text.is_file():
        eval_text(model, text)
    kld = llama_kld(a.llama_cpp, f32, [a.work / n for n in ggufs], text, a.work)
    # The search selected on the first two thirds of these windows; its held-out third alone (search.py
    # TEST_FRACTION), measured by llama.cpp too, is the claim that no selection touched.
    held = a.work / "heldout"
    held.mkdir(exist_ok=True)
    windows = text.read_text().splitlines()
    atomic_write_text(held / "heldout.txt", "\n".join(windows[len(windows) - math.ceil(len(windows) / 3):]) + "\n")
    kld_held = llama_kld(a.llama_cpp, f32, [a.work / n for n in ggufs], held / "heldout.txt", held)
    report = eval_plans(gguf=[a.work / n for n in ggufs], model=str(a.model), progress=False)
    rows = []
    for pe in report.plans:
        r = pe.result
        rows.append({**ggufs[pe.name], "gguf": pe.name, "bpw": pe.avg_bits, "bytes": pe.size_bytes, "kl": r.kl,
                     "ppl": r.ppl, "ppl_fp": r.ppl_fp, "agreement": r.agreement, "llama_kld": kld[pe.name], "llama_kld_heldout": kld_held[pe.name],
                     "file_bytes": (a.work / pe.name).stat().st_size})
    rows.sort(key=lambda r: r["bpw"])
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out / "result.json", json.dumps(rows, indent=1) + "\n")
    lines = ["| GGUF | made by | file MiB | bits per weight (components) | KL (paretoq eval --gguf) "
             "| mean KLD (llama-perplexity) | KL / KLD | mean KLD, held-out third | perplexity | top-1 agreement |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        who = (f"paretoq plan at budget {r['budget']:g}, base {r['base']}" if r["source"] == "paretoq"
               else f"llama.cpp {r['ftype']}")
        lines.append(f"| {r['gguf']} | {who} | {r['file_bytes'] / 2**20:.3f} | {r['bpw']:.3f} | {r['kl']:.4g} | "
                     f"{r['llama_kld']:.4g} | "
                     f"{r['kl'] / r['llama_kld']:.3f} | {r['llama_kld_heldout']:.4g} | {r['ppl']:.3f} | "
                     f"{r['agreement']:.4f} |")
    same = [sorted(rows, key=lambda r: r[k]) for k in ("kl", "llama_kld")]
    lines.append("\nThe two tools rank the files " + ("the same way." if same[0] == same[1] else "differently."))
    lines.append(f"\nFull-precision perplexity {rows[0]['ppl_fp']:.3f}." if rows else "")
    atomic_write_text(a.out / "result.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
