"""Does llama-quantize make the tensors the search measured? A --target llamacpp plan's GGUF against the quant cache.

    PARETOQ_CACHE=... python studies/llamacpp/plan_bytes.py PLAN_JSON GGUF [--model demo]

PLAN_JSON: a plan from ``paretoq search --target llamacpp`` (quant method ggml); GGUF: the file
``llama-quantize --imatrix I --tensor-type-file ...`` made from its export (run.py makes both), with
``PARETOQ_CACHE`` the cache the search filled. For every component, its rows in the GGUF tensor
(one expert's slice of a stacked tensor) are compared byte for byte with the quant cache's entry
at the plan's width, which is what the search evaluated. Tensors the converter splits (DeepSeek's
``attn_kv_b`` into ``attn_k_b``/``attn_v_b``) are counted apart: their rows differ by construction.
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
        name = f"{gguf_names(c)[0]}.weight"
        if name not in tensors:
            split += 1
            continue
        data = np.asarray(tensors[name].data)
        got = data[c.expert] if c.kind == "expert" else data
        want = prep.cache.get(key, b).data.numpy()
        if tensors[name].tensor_type.name.lower() == prep.cache.get(key, b).ggml_type and np.array_equal(got, want):
            same += 1
        else:
            differ.append(key)
    print(f"{a.gguf}: {same} of {len(plan.bits)} components equal byte for byte to what the search measured, "
          f"{len(differ)} differ{': ' + ', '.join(differ[:5]) if differ else ''}; {split} in tensors the converter "
          "splits (not compared)")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
