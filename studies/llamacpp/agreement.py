"""Why `paretoq eval --gguf`'s KL and llama-perplexity's mean KLD differ: the tokens they score.

    python studies/llamacpp/agreement.py LLAMA_CPP_DIR WORK [--ftypes Q2_K,Q3_K_S,...]

llama-perplexity reads a text file, tokenizes it whole (with the GGUF's vocabulary: not always the
model tokenizer's tokens), cuts the tokens into chunks of ``-c``,
puts BOS in each chunk's first position (when the vocabulary adds one) and scores the predictions
of the chunk's second half only. paretoq's eval scores every prediction of its own windows. On the
study's text (the eval windows decoded, one per line) the two therefore score different tokens in
different contexts. This script makes llama.cpp's mixtures of the demo, measures each with
llama-perplexity, and with paretoq's model and reference on (a) paretoq's windows, as `eval --gguf`
does, and (b) llama-perplexity's own chunks and positions, and prints the ratios to llama's KLD.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import convert, eval_text, llama_kld, quantize  # noqa: E402

from paretoq.data import load_token_sets  # noqa: E402
from paretoq.evaluate import Assembler, _logprobs  # noqa: E402
from paretoq.export.gguf_read import open_gguf  # noqa: E402
from paretoq.models.loading import demo_dir  # noqa: E402
from paretoq.walk import open_model  # noqa: E402

CTX = 256


def llama_tokens(llama: Path, gguf: Path, text: Path) -> list[int]:
    """The text as llama-perplexity tokenizes it (the GGUF's vocabulary and pre-tokenizer, BOS when the
    vocabulary adds one, no escapes or special tokens parsed): ``llama-tokenize --ids``."""
    out = subprocess.run([str(llama / "build" / "bin" / "llama-tokenize"), "-m", str(gguf), "-f", str(text), "--ids",
                          "--no-escape", "--no-parse-special", "--log-disable"],  # as llama-perplexity reads the file
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def llama_chunks(ids: list[int], bos: int | None, ctx: int = CTX) -> torch.Tensor:
    """The chunks llama-perplexity scores: the tokens cut into ``ctx``-token chunks, each chunk's first
    token replaced by BOS when the vocabulary adds one (``bos``: its id, else None)."""
    t = torch.tensor(ids)
    n = t.numel() // ctx
    chunks = t[: n * ctx].reshape(n, ctx).clone()
    if bos is not None:
        chunks[:, 0] = bos
    return chunks


def kl_by_position(model, ids: torch.Tensor, ref: list[torch.Tensor], floor: float | None = None) -> torch.Tensor:
    """KL(fp || model) per (window, prediction): ``[windows, seq - 1]``. With ``floor``, only the
    tokens whose fp log-probability is above it count, as llama-perplexity sums (``> -16``)."""
    out = []
    for batch, lp in zip(ids.split(8), ref):
        lq = _logprobs(model, batch)
        terms = lp.exp() * (lp - lq)
        out.append((terms if floor is None else terms * (lp > floor)).sum(-1))
    return torch.cat(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("llama_cpp", type=Path)
    p.add_argument("work", type=Path)
    p.add_argument("--ftypes", default="Q2_K,Q3_K_S,Q3_K_M,Q4_K_S,Q4_K_M")
    a = p.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    f32 = a.work / "model-f32.gguf"
    if not f32.is_file():
        convert(a.llama_cpp, demo_dir(), f32)
    ggufs = []
    for ftype in a.ftypes.split(","):
        out = a.work / f"llamacpp-{ftype}.gguf"
        if not out.is_file():
            quantize(a.llama_cpp, f32, out, ftype)
        ggufs.append(out)
    text_file = a.work / "eval.txt"
    eval_text(demo_dir(), text_file)
    llama = llama_kld(a.llama_cpp, f32, ggufs, text_file, a.work)

    sm = open_model("demo")
    sm.materialize_all()
    tok = sm.loaded.tokenizer
    windows = load_token_sets(tok).eval.input_ids
    ids = llama_tokens(a.llama_cpp, f32, text_file)
    hf_ids = tok(text_file.read_text()).input_ids
    same = next((i for i, (x, y) in enumerate(zip(ids, hf_ids)) if x != y), min(len(ids), len(hf_ids)))
    print(f"llama.cpp tokenizes the text into {len(ids)} tokens, the model's tokenizer into {len(hf_ids)}; "
          f"they agree on the first {same}", file=sys.stderr)
    bos = tok.bos_token_id if ids and ids[0] == tok.bos_token_id and hf_ids[0] != tok.bos_token_id else None
    chunks = llama_chunks(ids, bos)
    ref_w = [_logprobs(sm.model, b) for b in windows.split(8)]
    ref_c = [_logprobs(sm.model, b) for b in chunks.split(8)]
    first = CTX // 2  # llama-perplexity: logits of positions first .. ctx-2, predicting first+1 .. ctx-1
    rows = []
    for path in ggufs:
        g = open_gguf(path, sm.adapter, sm.model.config)
        weight_of, bits = g.as_plan(sm.adapter)
        with Assembler(sm.adapter, weight_of).apply(bits):
            kw = kl_by_position(sm.model, windows, ref_w)
            kc = kl_by_position(sm.model, chunks, ref_c)
            kt = kl_by_position(sm.model, chunks, ref_c, floor=-16.0)
        rows.append({"gguf": path.name, "llama_kld": llama[path.name], "paretoq_windows": kw.mean().item(),
                     "paretoq_llama_chunks": kc[:, first:].mean().item(),
                     "paretoq_llama_chunks_all_positions": kc.mean().item(),
                     "paretoq_llama_chunks_truncated": kt[:, first:].mean().item()})
    print(json.dumps({"windows": list(windows.shape), "llama_chunks": list(chunks.shape), "rows": rows}, indent=1))
    print("| GGUF | llama-perplexity KLD | paretoq, its windows (ratio) | paretoq, llama's chunks and positions (ratio) "
          "| the same, only tokens with fp log-prob > -16 (ratio) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        k = r["llama_kld"]
        print(f"| {r['gguf']} | {k:.4g} | {r['paretoq_windows']:.4g} ({r['paretoq_windows'] / k:.3f}x) | "
              f"{r['paretoq_llama_chunks']:.4g} ({r['paretoq_llama_chunks'] / k:.3f}x) | "
              f"{r['paretoq_llama_chunks_truncated']:.4g} ({r['paretoq_llama_chunks_truncated'] / k:.3f}x) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
