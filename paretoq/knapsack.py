"""The exact multiple-choice knapsack: one width per group, the least total cost within the budget.

    minimise   sum_g cost[g, c_g]
    subject to sum_g params[g] * bits[g, c_g] <= budget * sum_g params[g]

This is what exllamav2's "measure, then optimise" and the knapsack baseline solve over measured
sensitivities, and what minimising any surrogate that is additive over (group, width) choices
comes to. A greedy by cost saved per added bit is not optimal: with groups of 1 and 10 parameters
it buys the small group's upgrade and strands the budget the large one needed (tests). It is
solved here as a 0/1 integer program with HiGHS (``scipy.optimize.milp``) at a relative gap of 0,
so the answer is the optimum, not an approximation; a Lagrangian bound first fixes every group whose
choice it proves (``solve``), so HiGHS sees only a small core. The budget is
checked again in exact integer arithmetic on the result, since the solver's feasibility tolerance
could otherwise let a plan over the budget through.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix, vstack

TOL = 1e-9  # plans with avg bits <= budget + TOL count as within it, as everywhere in paretoq


def _milp(c: np.ndarray, w: np.ndarray, g_idx: np.ndarray, c_idx: np.ndarray, G: int, capacity: float,
          cuts: list[np.ndarray], exact_excess) -> np.ndarray | None:
    """HiGHS on the 0/1 program over the listed (group, choice) pairs; None when infeasible."""
    n = len(g_idx)
    c = c - c.min() if n else c
    c = c / (np.abs(c).max() if n and np.abs(c).max() > 0 else 1.0)
    rows = [csr_matrix((np.ones(n), (g_idx, np.arange(n))), shape=(G, n)), csr_matrix(w[None, :])]
    lb, ub = [np.ones(G), np.array([-np.inf])], [np.ones(G), np.array([capacity])]
    for hit in cuts:
        rows.append(csr_matrix(hit[None, :]))
        lb.append(np.array([-np.inf]))
        ub.append(np.array([hit.sum() - 1.0]))
    A = vstack(rows).tocsr()
    slack = 0.0
    for _ in range(6):  # tighten by any excess the solver's tolerance let through, then solve again
        upper = np.concatenate(ub)
        upper[G] -= slack
        res = milp(c, integrality=np.ones(n), bounds=Bounds(0, 1),
                   constraints=LinearConstraint(A, np.concatenate(lb), upper), options={"mip_rel_gap": 0.0})
        if res.x is None:
            return None
        chosen = res.x > 0.5
        pick = np.zeros(G, dtype=np.int64)
        pick[g_idx[chosen]] = c_idx[chosen]
        excess = exact_excess(pick)
        if excess <= 0:
            return pick
        slack += 1.01 * excess + 1e-12
    return None


def solve(cost: np.ndarray, bits: np.ndarray, params: np.ndarray, n_choices: np.ndarray, budget: float,
          exclude: list[np.ndarray] | tuple = ()) -> np.ndarray | None:
    """The genome (choice index per group) of least total ``cost`` ([G, C]) whose average ``bits``
    ([G, C]), weighted by ``params`` ([G]), is within ``budget``; None when no plan fits. Genomes in
    ``exclude`` are ruled out (one no-good cut each), for the next best distinct plan.

    Exact by Lagrangian reduced-cost fixing: for any multiplier lam >= 0 and any plan x within the
    budget, cost(x) >= L(lam) + sum_g rc_g(x_g), where L is the Lagrangian bound and rc_g(c) >= 0 the
    reduced cost of choice c in group g. With an incumbent of cost z, a choice with rc > z - L(lam)
    is in no plan better than the incumbent, so it is dropped; groups left with one choice are fixed.
    What remains (the groups near the multiplier's break point, a handful at any G) goes to HiGHS
    with a relative gap of 0. HiGHS alone takes 97 s at G = 16,000 (its root processing), this
    a fraction of a second."""
    cost, bits = np.asarray(cost, float), np.asarray(bits, float)
    params = np.asarray(params, float)
    G, C = cost.shape
    valid = np.arange(C)[None, :] < np.asarray(n_choices)[:, None]
    total = params.sum()
    weight = params[:, None] * bits
    lowest = np.where(valid, weight, np.inf).min(1)
    capacity = (budget * total - lowest.sum()) / total  # avg bits above every group's lightest choice
    if capacity < -TOL:
        return None
    capacity = max(capacity, 0.0)
    w = np.where(valid, (weight - lowest[:, None]) / total, np.inf)
    c = np.where(valid, cost, np.inf)
    rows = np.arange(G)
    excluded = {np.asarray(e, dtype=np.int64).tobytes() for e in exclude}

    def exact_excess(genome):  # in avg bits, exact enough: integers below 2^53 summed in float64
        return ((params * bits[rows, genome]).sum() - budget * total) / total - TOL

    def pick(lam):
        return np.argmin(c + lam * np.where(valid, w, 0.0), axis=1)  # ties: the lower index, the lighter choice

    def lagrangian(lam):
        return np.min(c + lam * np.where(valid, w, 0.0), axis=1).sum() - lam * capacity

    # The multiplier: the smallest lam whose pick fits the budget (bisection; any lam >= 0 is a valid bound).
    lo, hi = 0.0, 1.0
    if w[rows, pick(0.0)].sum() > capacity:
        while w[rows, pick(hi)].sum() > capacity:
            lo, hi = hi, hi * 4
        for _ in range(80):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if w[rows, pick(mid)].sum() <= capacity else (mid, hi)
    else:
        hi = 0.0
    lam = hi if lagrangian(hi) >= lagrangian(lo) else lo
    bound = lagrangian(lam)
    incumbent = _improve(pick(hi), c, w, capacity, excluded)
    z = c[rows, incumbent].sum() if incumbent is not None else np.inf
    scored = c + lam * np.where(valid, w, 0.0)
    rc = scored - scored.min(1, keepdims=True)
    keep = valid & (rc <= (z - bound) + 1e-9 * (abs(z) + abs(bound) + 1e-300))
    if incumbent is not None:
        keep[rows, incumbent] = True
    free = keep.sum(1) > 1
    fixed = np.argmax(keep, axis=1)  # the one choice left in a fixed group
    core = np.flatnonzero(free)
    sub = keep[core]
    g_sub, c_idx = np.nonzero(sub)
    cuts = []
    for e in exclude:  # a cut matters only where the excluded genome's choices are all still allowed
        e = np.asarray(e)
        if keep[rows, e].all() and (e[~free] == fixed[~free]).all():
            cuts.append((c_idx == e[core][g_sub]).astype(float))
    if incumbent is not None and not cuts and not len(core):
        return incumbent  # nothing can beat it

    def excess(part):
        genome = fixed.copy()
        genome[core] = part
        return exact_excess(genome)

    room = capacity - w[~free, fixed[~free]].sum()
    part = _milp(cost[core][g_sub, c_idx], w[core][g_sub, c_idx], g_sub, c_idx, len(core), room, cuts, excess)
    if part is None:
        return incumbent
    best = fixed.copy()
    best[core] = part
    if incumbent is not None and c[rows, incumbent].sum() < c[rows, best].sum():
        return incumbent
    return best


def _improve(genome: np.ndarray, c: np.ndarray, w: np.ndarray, capacity: float,
             excluded: set[bytes]) -> np.ndarray | None:
    """A feasible plan near ``genome`` (which fits): the budget it leaves spent by the best single
    changes, then, if it is excluded, the cheapest change that makes it a plan not excluded."""
    G = len(genome)
    rows = np.arange(G)
    genome = genome.copy()
    for _ in range(64):
        left = capacity - w[rows, genome].sum()
        dc = c - c[rows, genome][:, None]
        dw = w - w[rows, genome][:, None]
        ok = (dw <= left) & (dc < 0)
        if not ok.any():
            break
        g, k = np.unravel_index(np.argmin(np.where(ok, dc, np.inf)), c.shape)
        genome[g] = k
    if genome.tobytes() not in excluded:
        return genome
    left = capacity - w[rows, genome].sum()
    dc = c - c[rows, genome][:, None]
    dw = w - w[rows, genome][:, None]
    dc = np.where((dw <= left) & np.isfinite(dc) & (dc != 0) | ((dw <= left) & (np.arange(c.shape[1]) != genome[:, None])
                  & np.isfinite(dc)), dc, np.inf)
    for flat in np.argsort(dc, axis=None)[:256]:
        g, k = np.unravel_index(flat, c.shape)
        if not np.isfinite(dc[g, k]):
            break
        cand = genome.copy()
        cand[g] = k
        if cand.tobytes() not in excluded:
            return cand
    return None


def front(cost: np.ndarray, bits: np.ndarray, params: np.ndarray, n_choices: np.ndarray,
          budgets) -> list[tuple[float, np.ndarray]]:
    """The exact optimum at each of ``budgets`` (those that admit a plan): the predicted front of an
    additive model, one point per budget, duplicates dropped."""
    out, seen = [], set()
    for b in budgets:
        genome = solve(cost, bits, params, n_choices, b)
        if genome is not None and genome.tobytes() not in seen:
            seen.add(genome.tobytes())
            out.append((float(b), genome))
    return out
