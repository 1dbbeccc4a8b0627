"""Held-out comparison (issue 17): the plan `paretoq search` returns against the exact knapsack, the
seed papers' heuristics and uniform GPTQ, on eval windows the search never selected on, over seeds.

    PARETOQ_CACHE=... python studies/heldout/run.py [--models demo,DIR] [--budgets 2.5,3,4] [--seeds 0,1,2]
                                                    [--trials 100] [--sensitivity auto] [--out studies/heldout]

Each (model, seed) draws its own calibration and eval windows (``--seed`` of `paretoq search`), so
the seeds vary the data as well as the search. Every number in the table is ``kl_test``: mean
per-token KL(fp || plan) on the held-out third of the eval windows. The baselines are trials of the
same study, re-measured on the same held-out windows; "best heuristic" is the best seed-paper
heuristic within the budget, "uniform" the widest uniform plan within it. Writes result.json and
result.md (the table) into --out; rerunning resumes the studies.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from paretoq.cache import atomic_write_text
from paretoq.report import claims, front_dict
from paretoq.search import SearchConfig, run_search

HERE = Path(__file__).resolve().parent
NOT_HEURISTICS = ("knapsack",)


def one(model: str, budget: float, seed: int, trials: int, storage: str, out: Path, sensitivity: str = "auto") -> dict:
    name = f"heldout-{Path(model).name}-{budget:g}-seed{seed}" + ("" if sensitivity == "auto" else f"-{sensitivity}")
    state = run_search(SearchConfig(budget=budget, model=model, seed=seed, trials=trials, study=name,
                                    storage=storage, out=out / "runs" / name, progress=False,
                                    sensitivity=sensitivity))
    fd = front_dict(state)
    feasible = [b for b in fd["baselines"] if b["feasible"] and b["kl_test"] is not None]
    by_name = {b["name"]: b for b in feasible}
    heuristics = [b for b in feasible if not b["name"].startswith("uniform-") and b["name"] not in NOT_HEURISTICS]
    uniforms = [b for b in feasible if b["name"].startswith("uniform-")]
    best_h = min(heuristics, key=lambda b: b["kl_test"], default=None)  # the best in hindsight, favouring them
    uni = max(uniforms, key=lambda b: b["avg_bits"], default=None)
    c = claims(fd)
    m = state.plan.metrics if state.plan is not None else {}
    return {"model": model, "budget": budget, "seed": seed, "trials": trials, "sensitivity": sensitivity,
            "sensitivity_evaluations": state.evaluations.get("sensitivity"),
            "plan": {"avg_bits": m.get("avg_bits"), "kl": m.get("kl"), "kl_test": m.get("kl_test"),
                     "source": m.get("source")},
            "best_search_trial": c["best"],
            "knapsack": by_name.get("knapsack"),
            "best_heuristic": best_h, "uniform": uni}


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | budget | seed | returned plan (source) | best non-baseline trial | exact knapsack | "
             "returned / knapsack | best seed heuristic | uniform |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    f = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
    for r in rows:
        k = (r["knapsack"] or {}).get("kl_test")
        p = r["plan"]["kl_test"]
        h, u = r["best_heuristic"], r["uniform"]
        lines.append(
            f"| {Path(r['model']).name} | {r['budget']:g} | {r['seed']} | {f(p)} ({r['plan']['source']}) | "
            f"{f((r['best_search_trial'] or {}).get('kl_test'))} | {f(k)} | "
            f"{f(p / k) if p and k else '-'}x | {(h or {}).get('name', '-')} {f((h or {}).get('kl_test'))} | "
            f"{(u or {}).get('name', '-')} {f((u or {}).get('kl_test'))} |")
    lines += ["", "| model | budget | returned / knapsack, held out: mean (per seed) | returned / best heuristic | "
              "returned / uniform |", "| --- | --- | --- | --- | --- |"]
    for key in sorted({(r["model"], r["budget"]) for r in rows}):
        rs = [r for r in rows if (r["model"], r["budget"]) == key]

        def ratios(other: str) -> list[float]:
            return [r["plan"]["kl_test"] / r[other]["kl_test"] for r in rs
                    if r[other] and r[other].get("kl_test") and r["plan"]["kl_test"] is not None]

        cells = []
        for other in ("knapsack", "best_heuristic", "uniform"):
            v = ratios(other)
            cells.append(f"{np.exp(np.mean(np.log(v))):.3f}x ({', '.join(f'{x:.3f}' for x in v)})" if v else "-")
        lines.append(f"| {Path(key[0]).name} | {key[1]:g} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="demo")
    p.add_argument("--budgets", default="2.5,3,4")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--trials", type=int, default=100)  # paretoq search's default
    p.add_argument("--sensitivity", default="auto", help="paretoq search's --sensitivity (auto, lowest, unit, group)")
    p.add_argument("--out", default=str(HERE))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(out / 'heldout.db').resolve()}"
    rows = []
    for model in a.models.split(","):
        for seed in map(int, a.seeds.split(",")):
            for budget in map(float, a.budgets.split(",")):
                rows.append(one(model, budget, seed, a.trials, storage, out, a.sensitivity))
                print(json.dumps(rows[-1]), flush=True)
                atomic_write_text(out / "result.json", json.dumps(rows, indent=1) + "\n")
    lines = table(rows)
    atomic_write_text(out / "result.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
