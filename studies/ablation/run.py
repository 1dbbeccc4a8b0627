"""Ablation (issues 6 and 17): surrogate-assisted search against local search without the surrogate,
plain NSGA-II and random search, at the same number of plan evaluations.

Compute-matched: every mode gets the same number of evaluated plans (``evaluations`` in
config.json). The modes that stand on measured sensitivities (``surrogate`` and ``local``) pay for
them: each sensitivity evaluation is counted as one verified trial (conservatively: it runs on the
2,048 sensitivity tokens, a trial on the whole selection part), so they verify
``evaluations - S`` plans, where S is the sensitivity pass's evaluation count; ``nsga2`` and
``random`` verify all ``evaluations``. ``local`` is the trust-region search ranked by the
sensitivities alone (no fitted surrogate), so the surrogate's own contribution is surrogate -
local.

Each mode runs once per seed on the same setup per seed (capture, quant cache and sensitivities are
cached and shared), without the baselines, so each run's front is its own strategy's work. Two
scores:

- hypervolume of the verified points in (log10 KL, avg bits), both minimised, on the selection
  windows, after the same numbers of evaluations (sensitivity evaluations included), against one
  reference point for all runs: the worst log10 KL and avg bits seen, each pushed out by 5% of
  that objective's range. KL on a log scale because a front spans orders of magnitude of KL.
- the held-out KL (``kl_test``, windows no run selected on) of the plan each run returns within the
  budget.

Run from the repository root:  PARETOQ_CACHE=... python studies/ablation/run.py
Rerunning resumes: each study continues to its trial count, then the tables are recomputed.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from paretoq.cache import atomic_write_text
from paretoq.nsga import hypervolume_2d
from paretoq.probes.sensitivity import evaluations as sensitivity_evaluations
from paretoq.report import completed
from paretoq.search import SearchConfig, _check, run_search

HERE = Path(__file__).resolve().parent
USES_SENSITIVITY = ("surrogate", "local")


def main() -> int:
    cfg = json.loads((HERE / "config.json").read_text())
    storage = f"sqlite:///{HERE / 'ablation.db'}"
    total = cfg["evaluations"]
    points: dict[tuple[str, int], np.ndarray] = {}  # one row per evaluation: (log10 KL, bits), NaN for a sensitivity one
    held_out: dict[tuple[str, int], float] = {}
    spent: dict[str, int] = {}
    for mode in cfg["modes"]:
        for seed in cfg["seeds"]:
            name = f"ablation-{mode}-seed{seed}"
            base = SearchConfig(budget=cfg["budget"], model=cfg["model"], space=cfg["space"], trials=total, seed=seed,
                                mode=mode, with_baselines=False, study=name, storage=storage,
                                sensitivity=cfg["sensitivity"],
                                out=HERE / "runs" / name, progress=False)
            if mode in USES_SENSITIVITY:
                _, groups, _, _ = _check(base)
                spent[mode] = sensitivity_evaluations(groups, cfg["sensitivity"])
            trials = total - spent.get(mode, 0)
            print(f"{name}: {trials} verified trials + {spent.get(mode, 0)} sensitivity evaluations", flush=True)
            state = run_search(replace(base, trials=trials))
            done = sorted(completed(state.study), key=lambda t: t.number)[:trials]
            sens = np.full((spent.get(mode, 0), 2), np.nan)
            points[mode, seed] = np.vstack([sens, [[np.log10(t.values[0]), t.values[1]] for t in done]])
            held_out[mode, seed] = state.plan.metrics.get("kl_test") if state.plan is not None else None
    every = np.vstack([p[~np.isnan(p[:, 0])] for p in points.values()])
    lo, hi = every.min(0), every.max(0)
    reference = tuple(hi + 0.05 * (hi - lo))
    checkpoints = cfg["checkpoints"]

    def hv(p: np.ndarray, n: int) -> float:
        p = p[:n]
        p = p[~np.isnan(p[:, 0])]
        return hypervolume_2d(p, reference) if len(p) else 0.0

    rows = {}
    for mode in cfg["modes"]:
        h = np.array([[hv(points[mode, s], n) for n in checkpoints] for s in cfg["seeds"]])
        test = [held_out[mode, s] for s in cfg["seeds"]]
        rows[mode] = {"per_seed": h[:, -1].tolist(), "mean": h.mean(0).tolist(), "std": h.std(0, ddof=1).tolist(),
                      "sensitivity_evaluations": spent.get(mode, 0), "kl_test_per_seed": test}
    result = {"config": cfg, "reference_point": {"log10_kl": reference[0], "avg_bits": reference[1]}, "hypervolume": rows}
    atomic_write_text(HERE / "result.json", json.dumps(result, indent=1) + "\n")
    lines = ["| mode | sensitivity evals | " + " | ".join(f"HV after {n} evaluations (mean ± sd)" for n in checkpoints)
             + " | HV per seed (final) | returned plan's held-out KL per seed |",
             "| --- | --- |" + " --- |" * (len(checkpoints) + 2)]
    for mode, r in rows.items():
        cells = " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in zip(r["mean"], r["std"]))
        test = ", ".join("-" if v is None else f"{v:.4g}" for v in r["kl_test_per_seed"])
        lines.append(f"| {mode} | {r['sensitivity_evaluations']} | {cells} | "
                     f"{', '.join(f'{v:.4f}' for v in r['per_seed'])} | {test} |")
    atomic_write_text(HERE / "result.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
