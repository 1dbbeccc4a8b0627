"""The seed papers' heuristics (and the strongest practical peer's) as plan generators.

Each returns a bit width per group. Heuristics that rank groups (which experts, which layers, which
components get more bits) are matched to the budget: they take the longest prefix of their ranking
whose average bits stay within it. QuantMoE-Bench's heuristics move groups from 2 to 4 bits on
top of "attention (and dense layers) at 4, the rest at 2", as in its Tables 1-5; names follow the
papers.

- ``uniform-b``: every group at b bits (GPTQ-b).
- ``MoQE``: routed experts low (the highest width that fits), everything else at 8 (Kim et al.).
- ``+Attn``, ``+Attn+Shared``, ``+Attn+Shared+Freq``, ``+Attn+Shared+FirstL``, ``LinearOSP``,
  ``LayerISP`` (QuantMoE-Bench 4-5): attention/dense at 4, shared experts at 4, then the most used
  experts per layer / the first MoE layers / the components with the highest outlier score / the
  MoE blocks with the lowest predicted cosine score (most important) at 4.
- ``MoQa``: per layer, the Jenks high class of S_E at 4, the low class at 2, shared experts at 8,
  attention/dense at 4.
- ``MoEPTQ-R/s``: random experts at 4 (seed s), the rest as +Attn+Shared.
- ``knapsack``: exllamav2's "measure, then optimise": each group's sensitivity at each width, then
  the exact multiple-choice knapsack (``paretoq.knapsack``): the least summed sensitivity within
  the budget. (A greedy by KL saved per added bit is not optimal; it was the baseline before.)
"""

from __future__ import annotations

import random

import numpy as np

from paretoq import knapsack as mckp
from paretoq.probes.features import Features
from paretoq.space import Group, avg_bits

LOW, HIGH = 2, 4  # QuantMoE-Bench's two widths
KNAPSACK_SECONDS = 60.0  # HiGHS time limit for the knapsack baseline (paretoq.knapsack.solve; the DP path needs none)
MOEPTQ_SEEDS = (0, 1, 2)


def _snap(group: Group, bits: int) -> int:
    """The group's largest choice not above ``bits`` (its smallest if none is)."""
    fits = [b for b in group.choices if b <= bits]
    return max(fits) if fits else min(group.choices)


def uniform(groups: list[Group], b: int) -> dict[str, int]:
    return {g.name: _snap(g, b) for g in groups}


def _fill(groups: list[Group], base: dict[str, int], order: list[Group], budget: float, high: int = HIGH) -> dict[str, int]:
    """Raise groups to ``high`` in ``order`` while the average stays within ``budget``."""
    bits = dict(base)
    total = sum(g.params for g in groups)
    used = sum(g.params * bits[g.name] for g in groups)
    for g in order:
        new = _snap(g, high)
        extra = g.params * (new - bits[g.name])
        if (used + extra) / total > budget + 1e-9:
            break
        bits[g.name], used = new, used + extra
    return bits


def _attn(groups, shared: bool) -> dict[str, int]:
    up = {"attn", "dense"} | ({"shared"} if shared else set())
    return {g.name: _snap(g, HIGH if g.kind in up else LOW) for g in groups}


def _feature(rows: dict, g: Group, name: str) -> float:
    """The largest value of a feature over the group's components."""
    return max(getattr(rows[k], name) for k in g.keys)


def moqe(groups: list[Group], budget: float) -> dict[str, int]:
    for e in (8, 4, 3, 2):
        bits = {g.name: _snap(g, e if g.kind == "expert" else 8) for g in groups}
        if avg_bits(groups, bits) <= budget + 1e-9:
            return bits
    return bits  # even 2-bit experts do not fit: reported as infeasible


def heuristics(groups: list[Group], features: Features, budget: float) -> dict[str, dict[str, int]]:
    experts = [g for g in groups if g.kind == "expert"]
    layers = sorted({g.layer for g in experts})
    base = _attn(groups, shared=True)
    rows = features.by_key()
    out = {f"uniform-{b}": uniform(groups, b) for b in (2, 3, 4, 8)}
    out["MoQE"] = moqe(groups, budget)
    out["+Attn"] = _attn(groups, shared=False)
    out["+Attn+Shared"] = base
    if experts:
        # +Freq: per layer, experts by usage; round-robin so every layer gets its most used first
        by_layer = {layer: sorted((g for g in experts if g.layer == layer),
                                  key=lambda g: -_feature(rows, g, "usage")) for layer in layers}
        rr = [by_layer[layer][i] for i in range(max(len(v) for v in by_layer.values()))
              for layer in layers if i < len(by_layer[layer])]
        out["+Attn+Shared+Freq"] = _fill(groups, base, rr, budget)
        first = sorted(experts, key=lambda g: (g.layer, g.name))
        out["+Attn+Shared+FirstL"] = _fill(groups, base, first, budget)
        outlier = sorted(experts, key=lambda g: -_feature(rows, g, "outlier"))
        out["LinearOSP"] = _fill(groups, base, outlier, budget)
        score = {layer: features.blocks[layer].score for layer in layers}
        important = sorted(experts, key=lambda g: (score[g.layer], g.name))  # low cosine = important
        out["LayerISP"] = _fill(groups, base, important, budget)
        moqa = {g.name: _snap(g, 8 if g.kind == "shared" else HIGH) for g in groups if g.kind != "expert"}
        for g in experts:
            high = features.jenks.get(g.layer, {}).get("high", [])
            members = {rows[k].expert for k in g.keys}
            moqa[g.name] = _snap(g, HIGH if members & set(high) else LOW)
        out["MoQa"] = moqa
        for s in MOEPTQ_SEEDS:
            order = list(experts)
            random.Random(s).shuffle(order)
            out[f"MoEPTQ-R/{s}"] = _fill(groups, base, order, budget)
    return out


def knapsack(groups: list[Group], sensitivity: dict[str, dict[int, float]], budget: float) -> dict[str, int]:
    """The plan of least summed sensitivity within the budget, solved exactly (``paretoq.knapsack``).
    Where even every group at its lowest width exceeds the budget, that plan (reported infeasible)."""
    C = max(len(g.choices) for g in groups)
    pad = [list(g.choices) + [g.choices[-1]] * (C - len(g.choices)) for g in groups]
    cost = np.array([[sensitivity[g.name][b] for b in row] for g, row in zip(groups, pad)])
    price = np.array([[g.cost(b) for b in row] for g, row in zip(groups, pad)], float)
    genome = mckp.solve(cost, price, np.array([g.params for g in groups], float),
                        np.array([len(g.choices) for g in groups]), budget, time_limit=KNAPSACK_SECONDS)
    if genome is None:
        return {g.name: min(g.choices) for g in groups}
    return {g.name: g.choices[int(i)] for g, i in zip(groups, genome)}
