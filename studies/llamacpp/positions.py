"""Why `paretoq eval --gguf`'s KL and llama-perplexity's mean KLD differ: which positions they score.

    python studies/llamacpp/positions.py WORK [RESULT_JSON]   # run.py's --work (its GGUFs) and result.json

llama-perplexity's KL divergence scores only the second half of each chunk (``first = n_ctx/2`` in
tools/perplexity), every token there with at least 128 tokens of context; paretoq scores every next-
token prediction of its 256-token windows, the first ones with almost no context. This prints, for
each GGUF of the study, paretoq's KL over all positions and over the second half only, beside
llama-perplexity's figure from run.py's result.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from paretoq.data import load_token_sets
from paretoq.eval_plans import outside_weights
from paretoq.evaluate import Assembler, _logprobs
from paretoq.export.gguf_read import open_gguf
from paretoq.walk import open_model


def per_position_kl(model, ids: torch.Tensor, ref: list[torch.Tensor]) -> torch.Tensor:
    """Mean KL(fp || model) at each position, over the windows."""
    total = None
    for batch, lp in zip(ids.split(8), ref):
        lq = _logprobs(model, batch)
        kl = (lp.exp() * (lp - lq)).sum(-1).sum(0)
        total = kl if total is None else total + kl
    return total / ids.shape[0]


def main() -> int:
    work = Path(sys.argv[1])
    llama = {r["gguf"]: r["llama_kld"] for r in json.loads(Path(sys.argv[2]).read_text())} if len(sys.argv) > 2 else {}
    sm = open_model("demo")
    sm.materialize_all()
    ids = load_token_sets(sm.loaded.tokenizer).eval.input_ids
    ref = [_logprobs(sm.model, b) for b in ids.split(8)]
    print("| GGUF | KL, all positions | KL, second half | mean KLD (llama-perplexity) | second half / KLD |")
    print("| --- | --- | --- | --- | --- |")
    for path in sorted(work.glob("*.gguf")):
        if path.name == "model-f32.gguf":
            continue
        g = open_gguf(path, sm.adapter, sm.model.config)
        weight_of, bits = g.as_plan(sm.adapter)
        with outside_weights(sm.model, g.outside()), Assembler(sm.adapter, weight_of).apply(bits):
            kl = per_position_kl(sm.model, ids, ref)
        half = kl[ids.shape[1] // 2 - 1:].mean().item()  # predictions of tokens 128..255
        k = llama.get(path.name)
        print(f"| {path.name} | {kl.mean().item():.4g} | {half:.4g} | {k if k is not None else '-'} | "
              f"{half / k if k else float('nan'):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
