"""Two sensitivity methods side by side: the held-out KL of the plan `paretoq search` returned with each.

    python studies/heldout/compare.py A/result.json B/result.json

A and B are `studies/heldout/run.py --sensitivity ...` outputs over the same models, budgets and
seeds (each seed draws the same windows whatever the method). Prints, per (model, budget, seed),
each returned plan's ``kl_test`` and the ratio B / A, the geometric mean of the ratios per budget
and over all cells, and the sensitivity evaluations each method spent per seed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    a, b = (json.loads(Path(p).read_text()) for p in sys.argv[1:3])
    name_a, name_b = (rows[0].get("sensitivity", "auto") for rows in (a, b))
    by_cell = {(r["model"], r["budget"], r["seed"]): r for r in a}
    print(f"| model | budget | seed | {name_a}: returned plan, held-out KL (source) | {name_b} | {name_b} / {name_a} |")
    print("| --- | --- | --- | --- | --- | --- |")
    ratios: dict[float, list[float]] = {}
    for r in b:
        key = (r["model"], r["budget"], r["seed"])
        if key not in by_cell:
            continue
        ka, kb = by_cell[key]["plan"]["kl_test"], r["plan"]["kl_test"]
        ratios.setdefault(r["budget"], []).append(kb / ka)
        print(f"| {Path(r['model']).name} | {r['budget']:g} | {r['seed']} | {ka:.4g} ({by_cell[key]['plan']['source']}) "
              f"| {kb:.4g} ({r['plan']['source']}) | {kb / ka:.3f}x |")
    every = [x for v in ratios.values() for x in v]
    print()
    for budget, v in sorted(ratios.items()):
        print(f"budget {budget:g}: geometric mean {name_b} / {name_a} = {np.exp(np.mean(np.log(v))):.3f}x over {len(v)} seeds")
    if every:
        print(f"all {len(every)} cells: {np.exp(np.mean(np.log(every))):.3f}x; {name_b} no worse in "
              f"{sum(x <= 1 for x in every)} of {len(every)}")
    for rows, name in ((a, name_a), (b, name_b)):
        spent = {}
        for r in rows:
            spent[(r["model"], r["seed"])] = max(spent.get((r["model"], r["seed"]), 0), r.get("sensitivity_evaluations") or 0)
        print(f"{name}: sensitivity evaluations per (model, seed): {sorted(set(spent.values()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
