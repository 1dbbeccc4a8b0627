"""Held-out KL of plan files on the demo, on the windows `paretoq search` holds out (issue 17).

    PARETOQ_CACHE=... python studies/demo/heldout_compare.py studies/demo/plan-3bit.json OTHER/plan.json ...

Builds the same parts as the search (``search._check`` and ``search._prepare``: the last third of
the eval windows is "test") and prints each plan's avg bits and KL on "select" and "test".
"""

import json
import sys

from paretoq.search import SearchConfig, _check, _prepare


def main(paths: list[str]) -> int:
    cfg = SearchConfig(budget=3.0, progress=False)
    _, groups, sets, sm = _check(cfg)
    prep = _prepare(cfg, groups, sets, sm)
    print("| plan | avg bits | KL (select) | KL (held out) |")
    print("| --- | --- | --- | --- |")
    for path in paths:
        plan = json.loads(open(path).read())
        bits = plan["bits"]
        total = sum(prep.adapter.component(k).params for k in bits)
        avg = sum(prep.adapter.component(k).params * b for k, b in bits.items()) / total
        sel, test = prep.evaluator.evaluate(bits, "select"), prep.evaluator.evaluate(bits, "test")
        print(f"| {path} | {avg:.3f} | {sel.kl:.6g} | {test.kl:.6g} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
