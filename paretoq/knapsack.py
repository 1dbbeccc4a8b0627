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
          cuts: list[np.ndarray], exact_excess, time_limit: float | None = None) -> np.ndarray | None:
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
                   constraints=LinearConstraint(A, np.concatenate(lb), upper),
                   options={"mip_rel_gap": 0.0, **({"time_limit": time_limit} if time_limit else {})})
        if res.x is None:
            return None
        global last_proven
        last_proven = last_proven and res.status == 0  # 1: the time limit, with the best plan found
        chosen = res.x > 0.5
        pick = np.zeros(G, dtype=np.int64)
        pick[g_idx[chosen]] = c_idx[chosen]
        excess = exact_excess(pick)
        if excess <= 0:
            return pick
        slack += 1.01 * excess + 1e-12
    return None


last_proven = True  # whether the latest solve proved its plan optimal (False only after a HiGHS time limit)


def solve(cost: np.ndarray, bits: np.ndarray, params: np.ndarray, n_choices: np.ndarray, budget: float,
          exclude: list[np.ndarray] | tuple = (), time_limit: float | None = None) -> np.ndarray | None:
    """The genome (choice index per group) of least total ``cost`` ([G, C]) whose average ``bits``
    ([G, C]), weighted by ``params`` ([G]), is within ``budget``; None when no plan fits. Genomes in
    ``exclude`` are ruled out (one no-good cut each), for the next best distinct plan.

    Exact by Lagrangian reduced-cost fixing: for any multiplier lam >= 0 and any plan x within the
    budget, cost(x) >= L(lam) + sum_g rc_g(x_g), where L is the Lagrangian bound and rc_g(c) >= 0 the
    reduced cost of choice c in group g. With an incumbent of cost z, a choice with rc > z - L(lam)
    is in no plan better than the incumbent, so it is dropped; groups left with one choice are fixed.
    What remains (the groups near the multiplier's break point) is solved by an exact dynamic
    programme over integer bit-parameters (``_dp``) where its table is small, else by HiGHS with a
    relative gap of 0. HiGHS alone took 97 s at G = 16,000 with random costs (its root processing),
    this 1.4 s. HiGHS can be slow to prove optimality when many groups share one size (a symmetric
    knapsack: 100 s at G = 640); ``time_limit`` then bounds it and the best plan found is returned,
    ``last_proven`` saying whether it is proven optimal. A core too large for both (MILP_MAX_GROUPS)
    gets the Lagrangian incumbent, unproven."""
    global last_proven
    last_proven = True
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

    part = None
    if not cuts:  # the core by dynamic programming over integer bit-parameters, where they are few
        part = _dp(cost[core], (params[core, None] * (bits[core] - bits[core].min(1, keepdims=True))),
                   valid[core], budget * total + TOL * total - (params * bits[rows, fixed]).sum()
                   + (params[core] * bits[core, fixed[core]]).sum() - (params[core] * bits[core].min(1)).sum())
    if part is None and len(core) > MILP_MAX_GROUPS and incumbent is not None:
        last_proven = False  # too big for the DP table and for HiGHS in bounded time: the incumbent
        return incumbent
    if part is None:
        room = capacity - w[~free, fixed[~free]].sum()
        part = _milp(cost[core][g_sub, c_idx], w[core][g_sub, c_idx], g_sub, c_idx, len(core), room, cuts, excess,
                     time_limit)
    if part is None:
        return incumbent
    best = fixed.copy()
    best[core] = part
    if incumbent is not None and c[rows, incumbent].sum() < c[rows, best].sum():
        return incumbent
    return best


DP_CELLS = 50_000_000  # groups x capacity units above which the core goes to HiGHS instead
# Cores of more groups than this that the DP cannot take are not given to HiGHS: its root node alone
# took 82 s on a 9,717-group core (synthetic, G = 16,000), its time limit notwithstanding. The
# Lagrangian incumbent (within one item's cost of the LP bound) is returned, ``last_proven`` False.
MILP_MAX_GROUPS = 2000


def _dp(cost: np.ndarray, weight: np.ndarray, valid: np.ndarray, room: float) -> np.ndarray | None:
    """Exact DP for the core: ``weight`` ([n, C], bit-parameters above each group's lightest choice)
    are integers, so in units of their greatest common divisor the capacity is an integer and
    dp[k] = least cost within k units is exact. Real models' parameter counts share large powers of
    two (dimensions are multiples of 128), so the units are few. None when the table would exceed
    DP_CELLS (then HiGHS solves the core)."""
    n, C = cost.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    W = np.where(valid, np.rint(weight), 0).astype(np.int64)
    unit = int(np.gcd.reduce(W[W > 0])) if (W > 0).any() else 1
    if room < 0:
        return None
    cap = int(np.floor(room / unit + 1e-9))
    cap = min(cap, int(W.max(1).sum() // unit))  # beyond every group at its heaviest, capacity is moot
    if n * (cap + 1) > DP_CELLS:
        return None
    W //= unit
    dp = np.zeros(cap + 1)
    choice = np.zeros((n, cap + 1), dtype=np.int8)
    for g in range(n):
        best = np.full(cap + 1, np.inf)
        arg = np.zeros(cap + 1, dtype=np.int8)
        for c in range(C):
            if not valid[g, c] or W[g, c] > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[W[g, c]:] = dp[: cap + 1 - W[g, c]] + cost[g, c]
            better = cand < best
            best[better], arg[better] = cand[better], c
        dp, choice[g] = best, arg
    if not np.isfinite(dp[cap]):
        return None
    out = np.zeros(n, dtype=np.int64)
    k = cap
    for g in range(n - 1, -1, -1):  # dp is non-increasing in k, so the table at cap holds the optimum
        out[g] = choice[g, k]
        k -= W[g, out[g]]
    return out


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
    other = np.arange(c.shape[1])[None, :] != genome[:, None]
    dc = np.where(other & (dw <= left) & np.isfinite(dc), dc, np.inf)
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
