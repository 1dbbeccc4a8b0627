"""Sensitivity methods against per-group measurement (issue 17): how well each cheaper method ranks a
layer's experts as measuring each group alone does, and the held-out KL of the exact knapsack over
each at 2.5/3/4 bits.

    PARETOQ_CACHE=... python studies/demo/sensitivity_methods.py [MODEL] [SEED]

Methods: ``group`` (each group alone at each width), ``unit`` shares (the unit's KL shared by GPTQ
error x usage: the ``unit`` method; the same x the routed weight mass E[w^2]; GPTQ error alone),
and ``lowest`` (each group alone at its lowest width, scaled by GPTQ error). Writes
/tmp/sensitivity-methods-MODEL-SEED.json (figures) and prints one line per method.
"""
import json
import math
import sys
import time

import numpy as np
import torch

from paretoq.search import SearchConfig, _check, split_windows
from paretoq import calibrate
from paretoq.evaluate import StreamedEvaluator
from paretoq.probes.sensitivity import _at_lowest, _by_group, units
from paretoq.baselines import knapsack
from paretoq.space import avg_bits

model = sys.argv[1] if len(sys.argv) > 1 else "demo"; seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
cfg = SearchConfig(budget=3.0, model=model, seed=seed, progress=False)
space, groups, sets, sm = _check(cfg)
settings = cfg.settings()
parts = split_windows(sets.eval, math.ceil(cfg.sensitivity_tokens / cfg.seq_len))
widths = tuple(sorted({b for g in groups for b in g.choices}))
walk = calibrate.prepare(sm, sets.calib, parts, settings, widths, seed=seed, progress=False)
cap, _ = calibrate._read_light_captures(calibrate._capture_dir(walk.capture_key), sm.num_layers)
ev = StreamedEvaluator(sm, walk.cache.weight, parts, walk.references)
loss = walk.cache.loss
by_key = walk.features.by_key()
usage = {g.name: float(np.mean([by_key[k].usage for k in g.keys])) for g in groups}
# routed weight mass: sum over the expert's slots of w^2, as a share of the layer's slots
wsq = {}
for b in sm.adapter.moe_blocks:
    r = cap.routing[b.layer]
    idx, w = r.top_k_index.flatten(), r.top_k_weights.float().flatten()
    m = torch.zeros(b.num_experts, dtype=torch.float64).index_add_(0, idx, (w.double() ** 2)) / idx.numel()
    for e in range(b.num_experts):
        for p in ("gate_proj", "up_proj", "down_proj"):
            wsq[f"{b.experts_path}.{e}.{p}"] = float(m[e])
t = time.time()
measure = lambda bits: ev.evaluate(bits, "sens").kl
group_sens = _by_group(measure, groups, False)
t_group = time.time() - t
unit_kl = {}
for key, members in units(groups).items():
    for b in sorted({b for g in members for b in g.choices}):
        unit_kl[key, b] = measure({k: b for g in members if b in g.choices for k in g.keys})
def share(rule):
    out = {g.name: {} for g in groups}
    for key, members in units(groups).items():
        for b in sorted({b for g in members for b in g.choices}):
            at = [g for g in members if b in g.choices]
            s = {}
            for g in at:
                err = sum(v for k in g.keys if math.isfinite(v := loss.get((k, b), math.nan)))
                s[g.name] = max(err, 0) * rule(g)
            tot = sum(s.values())
            for g in at:
                out[g.name][b] = unit_kl[key, b] * (s[g.name] / tot if tot > 0 else 1 / len(at))
    return out
rules = {
    "unit (GPTQ error x usage)": lambda g: usage[g.name],
    "GPTQ error x usage x E[w^2]": lambda g: float(np.mean([wsq.get(k, 1.0) for k in g.keys])) if g.kind == "expert" else 1.0,
    "GPTQ error alone": lambda g: 1.0,
}
res = {"model": model, "seed": seed, "groups": len(groups), "group_evals": sum(len(g.choices) for g in groups),
       "unit_evals": len(unit_kl), "seconds_group": t_group}
def lowest_scaled():
    """The ``lowest`` method, its one measurement per group taken from the per-group ones."""
    by_keys = {frozenset(g.keys): g for g in groups}
    return _at_lowest(lambda bits: group_sens[by_keys[frozenset(bits)].name][min(bits.values())], groups, loss, False)
variants = {"group (measured)": group_sens, **{k: share(r) for k, r in rules.items()}, "lowest": lowest_scaled()}

for name, sens in variants.items():
    row = {}
    # agreement with per-group measurement, experts only, within units: log-ratio error and rank corr
    errs, rhos = [], []
    for key, members in units(groups).items():
        ex = [g for g in members if g.kind == "expert"]
        if len(ex) < 3: continue
        for b in (2, 3):
            a = np.array([sens[g.name][b] for g in ex]); m = np.array([group_sens[g.name][b] for g in ex])
            errs += list(np.log(np.maximum(a, 1e-12) / np.maximum(m, 1e-12)))
            ra, rm = a.argsort().argsort(), m.argsort().argsort()
            rhos.append(np.corrcoef(ra, rm)[0, 1])
    row["expert_log_err_rms"] = float(np.sqrt(np.mean(np.square(errs)))) if errs else None
    row["expert_spearman_mean"] = float(np.mean(rhos)) if rhos else None
    for budget in (2.5, 3.0, 4.0):
        bits = knapsack(groups, sens, budget)
        comp = {k: bits[g.name] for g in groups for k in g.keys}
        row[f"{budget}"] = {"avg_bits": avg_bits(groups, bits), "kl_select": ev.evaluate(comp, "select").kl,
                            "kl_test": ev.evaluate(comp, "test").kl}
    res[name] = row
    print(name, json.dumps(row), flush=True)
json.dump(res, open(f"/tmp/sensitivity-methods-{model.replace('/', '_')}-{seed}.json", "w"), indent=1)
