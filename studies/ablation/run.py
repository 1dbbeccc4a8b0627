"""Ablation (issue 6): surrogate-assisted search vs plain NSGA-II vs random search, same verified trials.

Each mode runs once per seed on the same setup (capture, quant cache, measured sensitivities: cached,
shared by all runs), without the baselines, so each run's front is its own strategy's work. The
score is the hypervolume of the verified front in (log10 KL, avg bits), both minimised, against
one reference point for all runs: the worst log10 KL and the worst avg bits seen in any run, each
pushed out by 5% of that objective's range, so every run's points count and the runs compare.
KL on a log scale, because a front spans orders of magnitude of KL (2 to 8 bits) and a linear
scale would count only the 2-bit end.

Run from the repository root:  PARETOQ_CACHE=... python studies/ablation/run.py
Rerunning resumes: each study continues to its trial count, then the table is recomputed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from paretoq.cache import atomic_write_text
from paretoq.nsga import hypervolume_2d
from paretoq.report import completed
from paretoq.search import SearchConfig, run_search

HERE = Path(__file__).resolve().parent
CHECKPOINTS = (10, 20, 40)  # hypervolume after this many verified trials


def main() -> int:
    cfg = json.loads((HERE / "config.json").read_text())
    storage = f"sqlite:///{HERE / 'ablation.db'}"
    points: dict[tuple[str, int], np.ndarray] = {}
    for mode in cfg["modes"]:
        for seed in cfg["seeds"]:
            name = f"ablation-{mode}-seed{seed}"
            print(f"{name} ...", flush=True)
            state = run_search(SearchConfig(
                budget=cfg["budget"], model=cfg["model"], space=cfg["space"], trials=cfg["trials"], seed=seed,
                mode=mode, with_baselines=cfg["with_baselines"], study=name, storage=storage,
                out=HERE / "runs" / name, progress=False))
            done = sorted(completed(state.study), key=lambda t: t.number)[: cfg["trials"]]
            points[mode, seed] = np.array([[np.log10(t.values[0]), t.values[1]] for t in done])
    every = np.vstack(list(points.values()))
    lo, hi = every.min(0), every.max(0)
    reference = tuple(hi + 0.05 * (hi - lo))
    rows = {}
    for mode in cfg["modes"]:
        hv = np.array([[hypervolume_2d(points[mode, s][:n], reference) for n in CHECKPOINTS] for s in cfg["seeds"]])
        rows[mode] = {"per_seed": hv[:, -1].tolist(), "mean": hv.mean(0).tolist(), "std": hv.std(0, ddof=1).tolist()}
    result = {"config": cfg, "reference_point": {"log10_kl": reference[0], "avg_bits": reference[1]},
              "checkpoints": list(CHECKPOINTS), "hypervolume": rows}
    atomic_write_text(HERE / "result.json", json.dumps(result, indent=1) + "\n")
    lines = ["| mode | " + " | ".join(f"HV after {n} trials (mean ± sd)" for n in CHECKPOINTS) + " | per seed (final) |",
             "| --- |" + " --- |" * (len(CHECKPOINTS) + 1)]
    for mode, r in rows.items():
        cells = " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in zip(r["mean"], r["std"]))
        lines.append(f"| {mode} | {cells} | {', '.join(f'{v:.4f}' for v in r['per_seed'])} |")
    atomic_write_text(HERE / "result.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
