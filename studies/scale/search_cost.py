"""Search cost at real group counts (issue 17): paretoq's own overhead per verified trial, no model.

The search (``paretoq.search.search``: sensitivities, baselines, the study, the rounds, the held-out
re-measurement, the outputs) runs on a synthetic ``Prepared``: G groups shaped like Qwen3-30B-A3B's
(per layer 128 routed experts of 3 x 768 x 2048 and 4 attention projections), and an evaluator
whose KL is additive per group plus pairwise terms between neighbouring groups of a layer, computed
in O(G). Everything but the model is the real code path: the Optuna study in SQLite, genomes,
the exact knapsack, surrogate fits, local exchanges, NSGA-II children, the dashboard publisher.

Printed per G: proposal time per round (the rounds' ``_round`` calls), storage and bookkeeping
time per trial (the rest of the loop: Optuna's queue and attributes, the objective's own work,
the publisher), the overhead per verified trial (everything but the evaluator), and the peak RSS
of the process (each G in its own subprocess, so each peak is its own; it includes Python, torch,
Optuna and scikit-learn, about 0.4 GB).

    OMP_NUM_THREADS=1 python studies/scale/search_cost.py            # G = 64, 640, 6400, 16000
    OMP_NUM_THREADS=1 python studies/scale/search_cost.py --groups 640 --trials 60
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

GROUPS = (64, 640, 6400, 16000)
EXPERTS, ATTN = 128, 4  # per layer, as Qwen3-30B-A3B


class _Adapter:
    """What the search's plan arithmetic needs of an adapter: components by key."""

    model = SimpleNamespace(config=SimpleNamespace(model_type=None))  # a plan checks the model type it is for

    def __init__(self, components):
        self.components = components
        self.outer = []  # no token embedding or output head among them
        self._by_key = {c.key: c for c in components}

    def component(self, key):
        return self._by_key[key]

    def has(self, key):
        return key in self._by_key


class _Reference:
    ppl = 10.0


class SyntheticEvaluator:
    """KL = sum_g a_g 2^-b_g + sum over neighbouring pairs in a layer of c_gh 2^-b_g 2^-b_h (+ noise
    per part): additive with pairwise interactions, O(G) per plan."""

    def __init__(self, groups, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.index = {k: i for i, g in enumerate(groups) for k in g.keys}
        self.a = rng.lognormal(0, 1, len(groups)) * 1e-2 / len(groups)
        layer = np.array([g.layer for g in groups])
        self.pair = np.flatnonzero(layer[:-1] == layer[1:])  # (i, i + 1) within a layer
        self.c = rng.normal(0, 1, len(self.pair)) * self.a[self.pair] * 4
        self.evaluations = 0
        self.seconds = 0.0

    def reference(self, part):
        return _Reference()

    def evaluate(self, bits, part):
        from paretoq.evaluate import EvalResult

        t = time.perf_counter()
        e = np.zeros(len(self.a))
        for k, b in bits.items():
            e[self.index[k]] = 2.0 ** -b
        kl = float(self.a @ e + self.c @ (e[self.pair] * e[self.pair + 1])) * (1.03 if part == "test" else 1.0)
        self.evaluations += 1
        self.seconds += time.perf_counter() - t
        return EvalResult(kl=max(kl, 0.0), ppl=10.0 * math.exp(kl), ppl_fp=10.0, agreement=1 - kl, tokens=1,
                          exact_kl=True)


def synthetic(G: int, seed: int = 0):
    from paretoq.models import Component
    from paretoq.quant.quantizer import QuantSettings
    from paretoq.search import Prepared
    from paretoq.space import Group

    per_layer = EXPERTS + ATTN
    groups, comps = [], []
    for i in range(G):
        layer, j = divmod(i, per_layer)
        if j < ATTN:
            key, kind, shape = f"model.layers.{layer}.self_attn.p{j}", "attn", (2048, 2048)
        else:
            key, kind, shape = f"model.layers.{layer}.mlp.experts.{j - ATTN}.fused", "expert", (3 * 768, 2048)
        comps.append(Component(key, kind, layer, None if kind == "attn" else j - ATTN, "p", shape))
        groups.append(Group(key, kind, layer, (key,), shape[0] * shape[1], (2, 3, 4, 8)))
    ev = SyntheticEvaluator(groups, seed)
    rng = np.random.default_rng(seed + 1)
    loss = {(g.keys[0], b): float(ev.a[i] * rng.lognormal(0, 0.3) * 4.0 ** -b)
            for i, g in enumerate(groups) for b in g.choices}
    prep = Prepared(adapter=_Adapter(comps), model_info={"name_or_path": "synthetic", "model_type": "synthetic"},
                    settings=QuantSettings(), loss=loss, usage={}, evaluator=ev)
    return groups, prep


def run_one(G: int, trials: int, round_size: int, seed: int) -> dict:
    import paretoq.search as search
    from paretoq.dashboard import dashboard_installed
    from paretoq.storage import open_storage

    if dashboard_installed():  # imported once per process, not a per-trial cost
        import optuna_dashboard  # noqa: F401
        import plotly.graph_objects  # noqa: F401

    groups, prep = synthetic(G, seed)
    spent = {"propose": 0.0, "rounds": 0}
    real_round = search._round

    def timed_round(*args, **kwargs):
        t = time.perf_counter()
        out = real_round(*args, **kwargs)
        spent["propose"] += time.perf_counter() - t
        spent["rounds"] += 1
        return out

    search._round = timed_round
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the publisher records the last study used in ./studies
        url = f"sqlite:///{tmp}/s.db"
        cfg = search.SearchConfig(budget=3.0, model="synthetic", trials=trials, round_size=round_size, seed=seed,
                                  study=f"cost-{G}", storage=url, out=Path(tmp) / "out", progress=False)
        t = time.perf_counter()
        state = search.search(cfg, groups, prep, open_storage(url))
        total = time.perf_counter() - t
    ev = prep.evaluator
    loop = state.timings["verified trials"]
    eval_in_loop = ev.seconds * state.evaluations["verified trials"] / max(ev.evaluations, 1)  # ~ all O(G), equal
    overhead = (loop - eval_in_loop) / trials
    return {"groups": G, "trials": trials, "round_size": round_size, "rounds": spent["rounds"],
            "proposal_s_per_round": spent["propose"] / max(spent["rounds"], 1),
            "storage_s_per_trial": (loop - eval_in_loop - spent["propose"]) / trials,
            "overhead_s_per_trial": overhead, "evaluator_s_per_eval": ev.seconds / max(ev.evaluations, 1),
            "setup_s": state.timings["measured sensitivity"] + state.timings["baselines (heuristics, exact knapsack)"],
            "outputs_s": total - sum(v for k, v in state.timings.items() if k != "total"),
            "sensitivity_evaluations": state.evaluations["sensitivity"],
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, nargs="*", default=list(GROUPS))
    p.add_argument("--trials", type=int, default=60)
    p.add_argument("--round-size", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one G, JSON on stdout
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.groups[0], args.trials, args.round_size, args.seed)))
        return 0
    rows = []
    print("| G | proposal s/round | storage s/trial | overhead s/trial | peak RSS GB | sensitivity evals |")
    print("| --- | --- | --- | --- | --- | --- |")
    for G in args.groups:
        out = subprocess.run([sys.executable, __file__, "--one", "--groups", str(G), "--trials", str(args.trials),
                              "--round-size", str(args.round_size), "--seed", str(args.seed)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"| {G} | {r['proposal_s_per_round']:.2f} | {r['storage_s_per_trial']:.3f} | "
              f"{r['overhead_s_per_trial']:.3f} | {r['peak_rss_gb']:.2f} | {r['sensitivity_evaluations']} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
