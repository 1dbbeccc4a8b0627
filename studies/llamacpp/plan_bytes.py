"""Does llama-quantize make the tensors the search measured? A --target llamacpp plan's GGUF against the quant cache.

    PARETOQ_CACHE=... python studies/llamacpp/plan_bytes.py PLAN_JSON GGUF [--model demo]

PLAN_JSON: a plan from ``paretoq search --target llamacpp`` (quant method ggml); GGUF: the file
``llama-quantize --imatrix I --tensor-type-file ...`` made from its export (run.py makes both), with
``PARETOQ_CACHE`` the cache the search filled. For every component, its rows in the GGUF tensor
(one expert's slice of a stacked tensor) are compared byte for byte with the quant cache's entry
at the plan's width, which is what the search evaluated. A component the converter splits
(DeepSeek's ``kv_b_proj`` into ``attn_k_b``/``attn_v_b``) is compared as the two tensors, whose
bytes the cache entry holds one after the other. Run it with the thread count the imatrix was made
with (run.py: ``OMP_NUM_THREADS=1``): Hessian sums differ in the last float bits between thread
counts, and K-quants with an importance matrix can round a row differently on such a difference.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from gguf import GGUFReader

from paretoq.calibrate import prepare
from paretoq.data import load_token_sets
from paretoq.export.llamacpp import gguf_names
from paretoq.plan import Plan
from paretoq.walk import open_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("plan")
    p.add_argument("gguf")
    p.add_argument("--model", default="demo")
    a = p.parse_args()
    plan = Plan.load(a.plan)
    if plan.quant.method != "ggml":
        print(f"{a.plan} is not a ggml plan (quant method {plan.quant.method!r})", file=sys.stderr)
        return 2
    sm = open_model(a.model)
    sets = load_token_sets(sm.loaded.tokenizer)
    widths = tuple(sorted(set(plan.bits.values())))
    prep = prepare(sm, sets.calib, {}, plan.quant, widths, features=False, progress=False)
    tensors = {t.name: t for t in GGUFReader(a.gguf).tensors}
    same, differ, split = 0, [], 0
    for key, b in plan.bits.items():
        c = sm.adapter.component(key)
        names = [f"{n}.weight" for n in gguf_names(c)]
        entry = prep.cache.get(key, b)
        if entry.split:  # attn_k_b then attn_v_b, flat
            parts = [tensors.get(n) for n in names[1:]]
            got_types = "+".join(t.tensor_type.name.lower() for t in parts if t is not None)
            got = np.concatenate([np.asarray(t.data).reshape(-1) for t in parts if t is not None])
            split += 1
        else:
            got_types = tensors[names[0]].tensor_type.name.lower()
            data = np.asarray(tensors[names[0]].data)
            got = data[c.expert] if c.kind == "expert" else data
        want = entry.data.numpy()
        if got_types == entry.ggml_type and got.shape == want.shape and np.array_equal(got, want):
            same += 1
        else:
            differ.append(key)
    print(f"{a.gguf}: {same} of {len(plan.bits)} components equal byte for byte to what the search measured "
          f"({split} of them split by the converter), {len(differ)} differ"
          f"{': ' + ', '.join(differ[:5]) if differ else ''}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
