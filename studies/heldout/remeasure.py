"""Re-measure the plans of finished held-out studies on many more fresh windows.

`run.py` measures held-out KL on the last third of the search's eval windows: 11 windows of 256
tokens at the defaults, too few to separate plans a few percent apart (seed-to-seed spreads of
0.94-1.12x). This script takes each study's returned plan, exact knapsack and best searched trial
and measures them again on ``--windows`` windows that the study used for nothing: of the same
seeded shuffle of the demo text, the windows after its eval and calibration windows. The
quantized weights are the study's own (same calibration windows, so the quant cache is reused).
Per budget it prints each plan's KL and, for two result directories, the paired ratio of their
returned plans with a 95% interval over windows.

    PARETOQ_CACHE=/work/h17/cache python studies/heldout/remeasure.py /work/h17/group /work/h17/lowest \\
        [--windows 256] [--out studies/heldout/methods/fresh.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import optuna

from paretoq.cache import atomic_write_text
from paretoq.calibrate import prepare
from paretoq.data import DEFAULT_CALIB_TOKENS, DEFAULT_EVAL_TOKENS, DEFAULT_SEQ_LEN, TokenSet, load_token_sets
from paretoq.evaluate import StreamedEvaluator
from paretoq.plan import Plan
from paretoq.space import component_bits, decode_genome, load_space, make_groups
from paretoq.walk import open_model


def study_plans(result_dir: Path, groups) -> list[dict]:
    """Per study: budget, seed and the component bits of its returned plan, knapsack and best trial."""
    storage = f"sqlite:///{(result_dir / 'heldout.db').resolve()}"
    out = []
    for row in json.loads((result_dir / "result.json").read_text()):
        name = f"heldout-demo-{row['budget']:g}-seed{row['seed']}" + (
            "" if row["sensitivity"] == "auto" else f"-{row['sensitivity']}")
        study = optuna.load_study(study_name=name, storage=storage)
        by_number = {t.number: t for t in study.trials}
        returned = Plan.load(result_dir / "runs" / name / "plan.json")
        bits = lambda n: component_bits(groups, {g.name: g.choices[int(i)] for g, i in  # noqa: E731
                                                  zip(groups, decode_genome(by_number[n].user_attrs["genome"]))})
        out.append({"budget": row["budget"], "seed": row["seed"], "returned": returned.bits,
                    "knapsack": bits(row["knapsack"]["trial"]), "best_trial": bits(row["best_search_trial"]["trial"]),
                    "source": returned.metrics.get("source")})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", type=Path, help="run.py --out directories (result.json, heldout.db, runs/)")
    p.add_argument("--windows", type=int, default=256)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sm = open_model("demo")
    quant = Plan.load(next((a.results[0] / "runs").glob("*/plan.json"))).quant
    groups = make_groups(sm.adapter, load_space("default"), quant.budget_bits)
    studies = {str(d): study_plans(d, groups) for d in a.results}
    n_eval = math.ceil(DEFAULT_EVAL_TOKENS / DEFAULT_SEQ_LEN)
    n_calib = math.ceil(DEFAULT_CALIB_TOKENS / DEFAULT_SEQ_LEN)
    kl: dict[tuple, np.ndarray] = {}  # (result dir, budget, seed, plan) -> per-window KL
    for seed in sorted({s["seed"] for rows in studies.values() for s in rows}):
        sets = load_token_sets(sm.loaded.tokenizer, seed=seed)  # the studies' own calibration windows
        fresh_all = load_token_sets(sm.loaded.tokenizer, calib_tokens=DEFAULT_SEQ_LEN, seed=seed,
                                    eval_tokens=(n_eval + n_calib + a.windows) * DEFAULT_SEQ_LEN).eval
        fresh = TokenSet(fresh_all.input_ids[n_eval + n_calib:], f"{fresh_all.source}, unused windows")
        widths = tuple(sorted({b for rows in studies.values() for s in rows for b in s["returned"].values()}
                              | set(quant.widths)))
        prep = prepare(sm, sets.calib, {"fresh": fresh}, quant, widths, seed=seed, features=False, progress=False)
        ev = StreamedEvaluator(sm, prep.cache.weight, {"fresh": fresh}, prep.references)
        memo: dict[str, np.ndarray] = {}
        for d, rows in studies.items():
            for s in (r for r in rows if r["seed"] == seed):
                for which in ("returned", "knapsack", "best_trial"):
                    k = json.dumps(s[which], sort_keys=True)
                    if k not in memo:
                        memo[k] = np.asarray(ev.evaluate(s[which], "fresh").kl_windows)
                    kl[(d, s["budget"], seed, which)] = memo[k]
        print(f"seed {seed}: {len(memo)} distinct plans on {len(fresh.input_ids)} fresh windows", flush=True)

    report = {"windows": a.windows, "rows": []}
    for d, rows in studies.items():
        for s in rows:
            report["rows"].append({"result": d, "budget": s["budget"], "seed": s["seed"], "source": s["source"],
                                   **{w: float(kl[(d, s["budget"], s["seed"], w)].mean())
                                      for w in ("returned", "knapsack", "best_trial")}})
    print(f"\nmean KL on {a.windows} fresh windows per seed (returned / knapsack / best searched trial)")
    for r in report["rows"]:
        print(f"{Path(r['result']).name:8s} {r['budget']:4g} seed {r['seed']}: {r['returned']:.4g} ({r['source']}) "
              f"/ {r['knapsack']:.4g} / {r['best_trial']:.4g}")
    if len(a.results) == 2:
        d0, d1 = map(str, a.results)
        print(f"\nreturned plan, {Path(d1).name} / {Path(d0).name}: ratio of mean KL over seeds' windows, "
              f"95% interval (paired bootstrap over windows)")
        rng = np.random.default_rng(0)
        for budget in sorted({s["budget"] for s in studies[d0]}):
            seeds = sorted(s["seed"] for s in studies[d0] if s["budget"] == budget)
            x = np.concatenate([kl[(d1, budget, sd, "returned")] for sd in seeds])
            y = np.concatenate([kl[(d0, budget, sd, "returned")] for sd in seeds])
            idx = rng.integers(0, len(x), (2000, len(x)))
            boot = x[idx].mean(1) / y[idx].mean(1)
            lo, hi = np.quantile(boot, [0.025, 0.975])
            report.setdefault("ratios", {})[f"{budget:g}"] = {"ratio": float(x.mean() / y.mean()), "lo": float(lo),
                                                              "hi": float(hi)}
            print(f"  {budget:g} bits: {x.mean() / y.mean():.3f}x  [{lo:.3f}, {hi:.3f}]")
    if a.out:
        atomic_write_text(a.out, json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
