"""A search's outputs: ``plan.json``, ``front.json``, ``front.png`` and ``report.md`` (DESIGN.md, Contracts)."""

from __future__ import annotations

import json
import math

import numpy as np
import optuna

from paretoq.cache import atomic_write, atomic_write_text
from paretoq.nsga import nondominated_ranks


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


def front_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The verified Pareto front over (KL, avg bits), all widths, sorted by avg bits."""
    done = completed(study)
    if not done:
        return []
    F = np.array([t.values for t in done])
    ranks = nondominated_ranks(F)
    front = [t for t, r in zip(done, ranks) if r == 0]
    unique = {}
    for t in sorted(front, key=lambda t: (t.values[1], t.values[0], t.number)):
        unique.setdefault(tuple(t.values), t)  # equal points once: the first trial that reached them
    return list(unique.values())


def front_dict(state) -> dict:
    return study_front(state.study, state.baselines, state.config.budget)


def study_front(study: optuna.Study, baselines: dict[str, int], budget: float) -> dict:
    """``front.json``'s content: the verified front and each baseline (name -> trial number) as points."""
    trials = {t.number: t for t in completed(study)}
    front = [{"avg_bits": t.values[1], "kl": t.values[0], "source": t.user_attrs.get("source"), "trial": t.number,
              "feasible": bool(t.user_attrs.get("feasible"))} for t in front_trials(study)]
    base = [{"name": name, "avg_bits": trials[n].values[1], "kl": trials[n].values[0], "trial": n,
             "feasible": bool(trials[n].user_attrs.get("feasible"))}
            for name, n in sorted(baselines.items(), key=lambda kv: trials[kv[1]].values[1])]
    return {"study": study.study_name, "budget": budget, "front": front, "baselines": base}


def baselines_table(baselines: list[dict], best_kl: float) -> list[str]:
    """Markdown rows comparing each baseline with the best plan within the budget."""
    lines = ["| baseline | trial | avg bits | KL | KL / best | within budget |", "| --- | --- | --- | --- | --- | --- |"]
    for b in baselines:
        lines.append(f"| {b['name']} | {b['trial']} | {b['avg_bits']:.3f} | {b['kl']:.4g} | {b['kl'] / best_kl:.2f}x | "
                     f"{'yes' if b['feasible'] else 'no'} |")
    return lines


def plot_front(state, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = completed(state.study)
    fd = front_dict(state)
    fig, ax = plt.subplots(figsize=(10, 6.5), constrained_layout=True)
    ax.scatter([t.values[1] for t in done], [t.values[0] for t in done], s=10, color="#bbbbbb", label="verified plans")
    f = fd["front"]
    ax.step([p["avg_bits"] for p in f], [p["kl"] for p in f], where="post", color="#1b9e77", lw=1.5)
    ax.scatter([p["avg_bits"] for p in f], [p["kl"] for p in f], s=22, color="#1b9e77", label="verified front", zorder=3)
    # Heuristics matched to one budget pile up at the same average bits: stack their labels.
    stack, last = 0, None
    for i, b in enumerate(sorted(fd["baselines"], key=lambda b: (round(b["avg_bits"], 1), b["kl"]))):
        ax.scatter(b["avg_bits"], b["kl"], marker="x", s=40, color="#d95f02", zorder=4,
                   label="baselines (seed heuristics, knapsack)" if i == 0 else None)
        stack = stack + 1 if last is not None and abs(b["avg_bits"] - last) < 0.1 else 0
        last = b["avg_bits"]
        ax.annotate(b["name"], (b["avg_bits"], b["kl"]), fontsize=7, xytext=(6, 3 + 9 * stack), textcoords="offset points",
                    arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.5} if stack else None)
    if state.plan is not None:
        m = state.plan.metrics
        best = next(t for t in done if t.number == m["trial"])
        ax.scatter(best.values[1], best.values[0], marker="*", s=220, color="#7570b3", zorder=5,
                   label=f"best within budget (KL {best.values[0]:.3g})")
    ax.axvline(state.config.budget, color="#7570b3", ls="--", lw=1, label=f"budget {state.config.budget:g} bits")
    if any(t.values[0] > 0 for t in done):
        ax.set_yscale("log")
    else:  # an interrupted search may have verified nothing yet
        ax.text(0.5, 0.5, "no verified plans yet", transform=ax.transAxes, ha="center")
    ax.set_xlabel("average bits per weight")
    ax.set_ylabel("KL(fp || plan) per token")
    ax.set_title(f"paretoq search: {state.study.study_name} ({len(done)} verified plans)")
    ax.legend(fontsize=8, loc="upper right")
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def report_markdown(state) -> str:
    fd = front_dict(state)
    cfg = state.config
    lines = [f"# paretoq search: {state.study.study_name}", "",
             f"Model `{cfg.model}`, budget **{cfg.budget:g}** average bits, space `{cfg.space}`, mode `{cfg.mode}`, "
             f"{len(completed(state.study))} verified plans, seed {cfg.seed}. Full-precision perplexity "
             f"{state.fp_ppl:.3f}.", ""]
    if state.plan is not None:
        m = state.plan.metrics
        lines += [f"**Best plan within the budget**: trial {m['trial']} ({m['source']}), KL {m['kl']:.4g}, "
                  f"perplexity {m['ppl']:.3f}, top-1 agreement {m['agreement']:.4f}.", ""]
    best_kl = state.plan.metrics["kl"] if state.plan is not None else math.nan
    lines += ["## Baselines", "", *baselines_table(fd["baselines"], best_kl)]
    lines += ["", "## Verified front", "", "| avg bits | KL | source | trial |", "| --- | --- | --- | --- |"]
    lines += [f"| {p['avg_bits']:.3f} | {p['kl']:.4g} | {p['source']} | {p['trial']} |" for p in fd["front"]]
    lines += ["", "## Surrogate", ""]
    if state.taus:
        lines.append("Kendall tau between predicted and measured KL on each round's proposals, predicted before "
                     "they were verified: " + ", ".join(f"round {r}: {tau:.2f}" for r, tau in state.taus) + ".")
    else:
        lines.append("No surrogate rounds (mode or trial count).")
    lines += ["", "## Time", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in state.timings.items()]
    return "\n".join(lines) + "\n"


def write_outputs(state, adapter) -> None:
    out = state.out
    out.mkdir(parents=True, exist_ok=True)
    if state.plan is not None:
        state.plan.save(out / "plan.json", adapter)
    atomic_write_text(out / "front.json", json.dumps(front_dict(state), indent=1) + "\n")
    atomic_write(out / "front.png", lambda tmp: plot_front(state, tmp))
    atomic_write_text(out / "report.md", report_markdown(state))
