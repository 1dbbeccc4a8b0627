"""What the token embedding and output head cost a --target llamacpp search at a real vocabulary.

    OMP_NUM_THREADS=1 python studies/scale/outer_cost.py MODEL_DIR [--widths 2,3,4,5,6,8]

MODEL_DIR: any supported model (studies/scale/make_model.py makes one at Qwen3-30B-A3B's shapes:
vocabulary 151,936 x hidden 2,048). Opens it streamed (only the parts outside the decoder layers are
read), quantizes its embedding and head at each width into a fresh quant cache as the search does
(`QuantCache.fill_outer`: ggml's quantizers, no importance, rows in chunks), then reads each entry
back and swaps it into the model as an evaluation does. Prints one JSON line: seconds per stage and
width, and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--widths", default="2,3,4,5,6,8")
    a = p.parse_args()
    from paretoq.quant.cache import QuantCache
    from paretoq.quant.quantizer import QuantSettings
    from paretoq.walk import open_model

    widths = tuple(int(w) for w in a.widths.split(","))
    t = time.time()
    sm = open_model(a.model, max_memory=0)
    out = {"open_seconds": round(time.time() - t, 1), "threads": torch.get_num_threads(),
           "outer": {c.key: list(c.shape) for c in sm.adapter.outer}}
    keys = {c.key for c in sm.adapter.outer}
    with tempfile.TemporaryDirectory() as root:
        # max_bytes=1: each cache holds one entry in memory (the search's holds one layer's at every width)
        cache = QuantCache(sm.adapter, None, "outer-cost", QuantSettings(method="ggml"), root=root, max_bytes=1)
        quantize, swap = {}, {}
        for b in widths:
            t = time.time()
            cache.fill_outer(keys, (b,))
            quantize[b] = round(time.time() - t, 1)
        fresh = QuantCache(sm.adapter, None, "outer-cost", QuantSettings(method="ggml"), root=root, max_bytes=1)
        for b in widths:  # read back from disk, dequantized and written into the model, then restored
            t = time.time()
            for k in keys:
                saved = sm.adapter.weight(k).detach().clone()
                sm.adapter.set_weight(k, fresh.weight(k, b))
                sm.adapter.set_weight(k, saved)
            swap[b] = round(time.time() - t, 1)
        out.update(quantize_seconds=quantize, swap_seconds=swap, computed=cache.computed,
                   loss={f"{k}@{b}": cache.loss[(k, b)] for k in sorted(keys) for b in widths})
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
