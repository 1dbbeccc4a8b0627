"""A search's outputs: ``plan.json``, ``front.json``, ``front.png`` and ``report.md`` (DESIGN.md, Contracts).

``kl`` is measured on the selection windows (what the search chose on), ``kl_test`` on held-out
windows it never used. Baselines are trials of the same study, so the front over all trials
contains them by construction; the claims ("beats the knapsack", "dominates uniform") are made on
the front of the non-baseline trials and on ``kl_test`` only.
"""

from __future__ import annotations

import json
import math

import numpy as np
import optuna

from paretoq.cache import atomic_write, atomic_write_text
from paretoq.nsga import nondominated_ranks


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def is_baseline(t: optuna.trial.FrozenTrial) -> bool:
    return str(t.user_attrs.get("source", "")).startswith("baseline:")


def front_of(trials) -> list[optuna.trial.FrozenTrial]:
    """The Pareto front of ``trials`` over (KL on the selection windows, avg bits), sorted by avg bits."""
    if not trials:
        return []
    F = np.array([t.values for t in trials])
    ranks = nondominated_ranks(F)
    front = [t for t, r in zip(trials, ranks) if r == 0]
    unique = {}
    for t in sorted(front, key=lambda t: (t.values[1], t.values[0], t.number)):
        unique.setdefault(tuple(t.values), t)  # equal points once: the first trial that reached them
    return list(unique.values())


def front_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The verified Pareto front over (KL, avg bits) of all trials, baselines included."""
    return front_of(completed(study))


def front_dict(state) -> dict:
    return study_front(state.study, state.baselines, state.config.budget, getattr(state, "held_out", None))


def study_front(study: optuna.Study, baselines: dict[str, int], budget: float, held_out: dict | None = None,
                done: list[optuna.trial.FrozenTrial] | None = None) -> dict:
    """``front.json``'s content: the verified front of all trials, the front of the search's own
    (non-baseline) trials, and each baseline (name -> trial number) as points, each with its
    held-out ``kl_test`` where it was re-measured. ``done``: the completed trials to summarise (a
    caller that draws them too passes its own snapshot: other workers keep completing trials)."""
    held_out = held_out or {}
    done = completed(study) if done is None else done
    trials = {t.number: t for t in done}

    def point(t):
        return {"avg_bits": t.values[1], "kl": t.values[0], "kl_test": held_out.get(t.number, {}).get("kl"),
                "source": t.user_attrs.get("source"), "trial": t.number, "feasible": bool(t.user_attrs.get("feasible"))}

    base = [{"name": name, "avg_bits": trials[n].values[1], "kl": trials[n].values[0],
             "kl_test": held_out.get(n, {}).get("kl"), "trial": n, "feasible": bool(trials[n].user_attrs.get("feasible"))}
            for name, n in sorted(baselines.items(), key=lambda kv: trials[kv[1]].values[1])]
    return {"study": study.study_name, "budget": budget, "front": [point(t) for t in front_of(done)],
            "search_front": [point(t) for t in front_of([t for t in done if not is_baseline(t)])], "baselines": base}


def claims(fd: dict) -> dict:
    """What the held-out numbers say: the search's best plan within the budget (lowest selection KL
    among non-baseline trials) against each feasible baseline, and whether the search's own front
    dominates each uniform plan, all on ``kl_test``."""
    searched = [p for p in fd["search_front"] if p["feasible"] and p["kl_test"] is not None]
    best = min(searched, key=lambda p: p["kl"], default=None)
    ratios = {b["name"]: best["kl_test"] / b["kl_test"] for b in fd["baselines"]
              if best is not None and b["feasible"] and b["kl_test"]}
    dominated = {b["name"]: any(p["kl_test"] is not None and p["avg_bits"] <= b["avg_bits"] + 1e-9
                                and p["kl_test"] <= b["kl_test"] for p in fd["search_front"])
                 for b in fd["baselines"] if b["name"].startswith("uniform-") and b["kl_test"] is not None}
    return {"best": best, "ratio_to_baseline": ratios, "uniform_dominated": dominated}


def baselines_table(baselines: list[dict], best_kl: float, best_kl_test: float | None = None) -> list[str]:
    """Markdown rows comparing each baseline with the best plan within the budget (on the selection
    windows, and on the held-out ones where measured)."""
    lines = ["| baseline | trial | avg bits | KL (select) | KL (held out) | held out: searched / baseline | within budget |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for b in baselines:
        test = b.get("kl_test")
        ratio = f"{best_kl_test / test:.3f}x" if best_kl_test is not None and test else "-"
        lines.append(f"| {b['name']} | {b['trial']} | {b['avg_bits']:.3f} | {b['kl']:.4g} | "
                     f"{f'{test:.4g}' if test is not None else '-'} | {ratio} | {'yes' if b['feasible'] else 'no'} |")
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
    c = claims(fd)
    lines = [f"# paretoq search: {state.study.study_name}", "",
             f"Model `{cfg.model}`, budget **{cfg.budget:g}** average bits, space `{cfg.space}`, mode `{cfg.mode}`, "
             f"{len(completed(state.study))} verified plans, {len(state.groups)} groups, seed {cfg.seed}. "
             f"Full-precision perplexity {state.fp_ppl:.3f} on the selection windows, "
             f"{state.fp_ppl_test:.3f} on the held-out windows.", "",
             "KL (select) is measured on the windows the search chose on; KL (held out) on the last third of "
             "the eval windows, which no choice used. Claims below use the held-out numbers and the front of "
             "the search's own trials (baselines excluded).", ""]
    if state.plan is not None:
        m = state.plan.metrics
        test = f", held-out KL {m['kl_test']:.4g}" if m.get("kl_test") is not None else ""
        kept = m.get("kept_knapsack_over")
        title = "Returned plan, the exact knapsack's" if kept else "Best plan within the budget"
        lines += [f"**{title}**: trial {m['trial']} ({m['source']}), KL {m['kl']:.4g}{test}, "
                  f"perplexity {m['ppl']:.3f}, top-1 agreement {m['agreement']:.4f}.", ""]
        if kept:
            lines += [f"Trial {kept['trial']} had a lower KL on the selection windows ({kept['kl']:.4g}), but its lead "
                      f"over the knapsack, {kept['gain_per_window']:.3g} per window on average, is within what choosing "
                      f"the best of the searched plans gives by chance ({kept['gain_needed']:.3g}: sqrt(2 ln m) paired "
                      "standard errors), so the plan that needed no choosing is returned.", ""]
    best = c["best"]
    lines += ["## Claims (held-out windows, non-baseline trials)", ""]
    if best is None:
        lines.append("No non-baseline plan within the budget was re-measured on the held-out windows.")
    else:
        lines.append(f"The search's best plan within the budget: trial {best['trial']} ({best['source']}), "
                     f"{best['avg_bits']:.3f} bits, held-out KL {best['kl_test']:.4g}.")
        if "knapsack" in c["ratio_to_baseline"]:
            r = c["ratio_to_baseline"]["knapsack"]
            lines.append(f"Against the exact knapsack over measured sensitivities: {r:.3f}x its held-out KL "
                         f"({'better' if r < 1 else 'not better'}).")
        beaten = [n for n, r in c["ratio_to_baseline"].items() if r < 1]
        lost = [n for n, r in c["ratio_to_baseline"].items() if r >= 1]
        lines.append(f"Feasible baselines it beats on held-out KL: {', '.join(beaten) or 'none'}; "
                     f"it does not beat: {', '.join(lost) or 'none'}.")
    if c["uniform_dominated"]:
        lines.append("The front of the search's own trials dominates (fewer or equal bits, lower or equal held-out "
                     "KL) " + ", ".join(f"{n}: {'yes' if d else 'no'}" for n, d in c["uniform_dominated"].items()) + ".")
    best_kl = state.plan.metrics["kl"] if state.plan is not None else math.nan
    lines += ["", "## Baselines", "", *baselines_table(fd["baselines"], best_kl, best["kl_test"] if best else None)]
    for title, key in (("Front of the search's own trials", "search_front"), ("Front of all trials", "front")):
        lines += ["", f"## {title}", "", "| avg bits | KL (select) | KL (held out) | source | trial |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {p['avg_bits']:.3f} | {p['kl']:.4g} | {_fmt(p['kl_test'])} | "
                  f"{p['source']} | {p['trial']} |" for p in fd[key]]
    lines += ["", "## Surrogate", ""]
    if state.taus:
        lines.append("Kendall tau between predicted and measured KL on each round's proposals, predicted before "
                     "they were verified: " + ", ".join(f"round {r}: {tau:.2f}" for r, tau in state.taus) + ".")
    else:
        lines.append("No surrogate rounds (mode or trial count).")
    if getattr(state, "evaluations", None):
        lines += ["", "## Evaluations", "", "| stage | plans evaluated |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in state.evaluations.items()]
    lines += ["", "## Time", "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.1f} |" for k, v in state.timings.items()]
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def write_outputs(state, adapter) -> None:
    out = state.out
    out.mkdir(parents=True, exist_ok=True)
    if state.plan is not None:
        state.plan.save(out / "plan.json", adapter)
    atomic_write_text(out / "front.json", json.dumps(front_dict(state), indent=1) + "\n")
    atomic_write(out / "front.png", lambda tmp: plot_front(state, tmp))
    atomic_write_text(out / "report.md", report_markdown(state))
