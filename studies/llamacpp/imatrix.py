"""paretoq's importance matrix against llama.cpp's own, on the same text, read and used by llama.cpp.

    python studies/llamacpp/imatrix.py LLAMA_CPP_DIR [--work /tmp/paretoq-imatrix] [--out studies/llamacpp]
                                       [--ftypes Q2_K,Q3_K_S,IQ2_XS]

LLAMA_CPP_DIR: a llama.cpp tree with ``llama-quantize``, ``llama-perplexity`` and ``llama-imatrix``
built (run.py's docstring). On the demo:

1. ``paretoq imatrix`` over paretoq's calibration windows (seed 0), and ``llama-imatrix`` over the
   same windows decoded to text, one per line (llama.cpp re-tokenizes it into 256-token chunks);
2. per GGUF weight, the correlation of the two files' mean squares (sums / counts) over every
   entry, and their median ratio: the same statistic of nearly the same tokens, so a layout error
   (expert rows, names, the order of inputs) would show as a low correlation;
3. each ftype made by ``llama-quantize`` with no imatrix, with llama-imatrix's and with paretoq's,
   measured by ``llama-perplexity --kl-divergence`` on the eval windows (run.py's text).

Writes imatrix.json and imatrix.md into --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import convert, eval_text, llama_kld  # noqa: E402  (this study's sibling)

from paretoq.cache import atomic_write_text  # noqa: E402
from paretoq.export.imatrix import read  # noqa: E402

HERE = Path(__file__).resolve().parent


def calib_text(model: Path, out: Path) -> None:
    """paretoq's calibration windows of seed 0, decoded, one window per line."""
    from transformers import AutoTokenizer

    from paretoq.data import load_token_sets

    tok = AutoTokenizer.from_pretrained(str(model))
    atomic_write_text(out, "\n".join(tok.decode(w) for w in load_token_sets(tok).calib.input_ids) + "\n")


def quantize(llama: Path, src: Path, out: Path, ftype: str, imatrix: Path | None) -> None:
    args = [str(llama / "build" / "bin" / "llama-quantize")] + (["--imatrix", str(imatrix)] if imatrix else [])
    subprocess.run([*args, str(src), str(out), ftype], check=True, capture_output=True)


def compare(ours: Path, theirs: Path) -> list[dict]:
    a, b = read(ours), read(theirs)
    rows = []
    for name in sorted(set(a.sums) | set(b.sums)):
        if name not in a.sums or name not in b.sums:
            rows.append({"tensor": name, "only_in": "paretoq" if name in a.sums else "llama-imatrix"})
            continue
        x, y = a.mean_square(name), b.mean_square(name)
        seen = (a.counts[name] > 0) & (b.counts[name] > 0)  # rows both saw tokens for
        x, y = x[seen].ravel(), y[seen].ravel()
        rows.append({"tensor": name, "rows": int(seen.sum()), "corr": float(np.corrcoef(x, y)[0, 1]),
                     "median_ratio": float(np.median(x / y)),
                     "tokens": [float(a.counts[name].sum()), float(b.counts[name].sum())]})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("llama_cpp", type=Path)
    p.add_argument("--ftypes", default="Q2_K,Q3_K_S,IQ2_XS")
    p.add_argument("--work", type=Path, default=Path("/tmp/paretoq-imatrix"))
    p.add_argument("--out", type=Path, default=HERE)
    a = p.parse_args()
    from paretoq.models.loading import demo_dir

    model, work, bin_ = demo_dir(), a.work, a.llama_cpp / "build" / "bin"
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "model-f32.gguf"
    if not f32.is_file():
        convert(a.llama_cpp, model, f32)
    for name, make in (("calib.txt", calib_text), ("eval.txt", eval_text)):
        if not (work / name).is_file():
            make(model, work / name)
    ours, theirs = work / "paretoq.imatrix.gguf", work / "llama.imatrix.gguf"
    subprocess.run([sys.executable, "-m", "paretoq.cli", "imatrix", "--out", str(ours), "--quiet"], check=True)
    subprocess.run([str(bin_ / "llama-imatrix"), "-m", str(f32), "-f", str(work / "calib.txt"), "-c", "256", "-b", "256",
                    "-o", str(theirs), "--no-ppl", "-t", "2"], check=True, capture_output=True)
    agreement = compare(ours, theirs)
    ggufs, made = [], {}
    for ftype in a.ftypes.split(","):
        for who, im in (("none", None), ("llama-imatrix", theirs), ("paretoq", ours)):
            if im is None and ftype.startswith("IQ"):
                continue  # i-quants refuse to quantize without one
            out = work / f"{ftype}-{who}.gguf"
            quantize(a.llama_cpp, f32, out, ftype, im)
            ggufs.append(out)
            made[out.name] = {"ftype": ftype, "imatrix": who, "file_bytes": out.stat().st_size}
    kld = llama_kld(a.llama_cpp, f32, ggufs, work / "eval.txt", work)
    result = {"agreement": agreement, "kld": [{**made[n], "gguf": n, "llama_kld": k} for n, k in kld.items()]}
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out / "imatrix.json", json.dumps(result, indent=1) + "\n")
    both = [r for r in agreement if "corr" in r]
    corr = np.array([r["corr"] for r in both])
    ratio = np.array([r["median_ratio"] for r in both])
    lines = [f"{len(both)} tensors in both files ({sum('only_in' in r for r in agreement)} in one only: "
             f"{', '.join(r['tensor'] + ' (' + r['only_in'] + ')' for r in agreement if 'only_in' in r) or 'none'}).",
             f"Correlation of mean squares per tensor: min {corr.min():.4f}, median {np.median(corr):.4f}; "
             f"median ratio paretoq / llama-imatrix: min {ratio.min():.3f}, max {ratio.max():.3f}.", "",
             "| ftype | imatrix | file MiB | mean KLD (llama-perplexity) |", "| --- | --- | --- | --- |"]
    for r in result["kld"]:
        lines.append(f"| {r['ftype']} | {r['imatrix']} | {r['file_bytes'] / 2**20:.3f} | {r['llama_kld']:.5f} |")
    atomic_write_text(a.out / "imatrix.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
