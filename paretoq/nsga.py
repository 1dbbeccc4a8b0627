"""A vectorised NSGA-II (Deb et al., 2002) over integer genomes.

Two uses. ``offspring``: one generation bred from the verified plans (selection on their measured
objectives and the budget), which the search enqueues as its exploration share and as the whole of
``--mode nsga2``. Optuna's NSGAIISampler cannot do this at real group counts: it samples one Optuna
parameter per group, and storing those costs O(G) database rows per trial (1.2 s/trial at 64 groups,
30-40 s at 1,500, measured); the study stores each genome as one attribute instead. ``nsga2``: a
whole run over a cheap objective, as NumPy arrays. Genes are ordinal (an index into a group's sorted
bit choices): mutation steps to a neighbouring width or resamples. Constraints follow Deb's rules:
a feasible genome beats an infeasible one, and of two infeasible ones the smaller violation wins.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Evaluate = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # genomes -> (objectives [N, M], violation [N])


def nondominated_ranks(F: np.ndarray) -> np.ndarray:
    """Pareto rank of each row of ``F`` (minimisation), 0 = non-dominated."""
    n = len(F)
    le = (F[:, None, :] <= F[None, :, :]).all(-1)
    lt = (F[:, None, :] < F[None, :, :]).any(-1)
    dominates = le & lt  # [i, j]: i dominates j
    count = dominates.sum(0)
    ranks = np.full(n, -1)
    r = 0
    current = np.flatnonzero(count == 0)
    while current.size:
        ranks[current] = r
        count = count - dominates[current].sum(0)
        count[ranks >= 0] = -1
        current = np.flatnonzero(count == 0)
        r += 1
    return ranks


def crowding(F: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    d = np.zeros(len(F))
    for r in np.unique(ranks):
        idx = np.flatnonzero(ranks == r)
        if idx.size <= 2:
            d[idx] = np.inf
            continue
        for m in range(F.shape[1]):
            order = idx[np.argsort(F[idx, m])]
            span = F[order[-1], m] - F[order[0], m] or 1.0
            d[order[0]] = d[order[-1]] = np.inf
            d[order[1:-1]] += (F[order[2:], m] - F[order[:-2], m]) / span
    return d


def _rank(F: np.ndarray, violation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feasible = violation <= 0
    ranks = np.empty(len(F))
    if feasible.any():
        ranks[feasible] = nondominated_ranks(F[feasible])
    top = ranks[feasible].max() + 1 if feasible.any() else 0
    order = np.argsort(np.argsort(violation[~feasible])) if (~feasible).any() else []
    ranks[~feasible] = top + 1 + np.asarray(order)  # worse than any feasible, by violation
    return ranks, crowding(F, ranks)


def _vary(pop: np.ndarray, parents: np.ndarray, mates: np.ndarray, n_choices: np.ndarray,
          rng: np.random.Generator) -> np.ndarray:
    """Uniform crossover, then per gene with probability 1/G a step to a neighbouring width (70%)
    or a resample (30%)."""
    n, G = len(parents), pop.shape[1]
    mask = rng.random((n, G)) < 0.5
    child = np.where(mask, pop[parents], pop[mates])
    mutate = rng.random((n, G)) < 1.0 / G
    step = np.where(rng.random((n, G)) < 0.5, -1, 1)
    resample = rng.integers(0, n_choices, size=(n, G))
    moved = np.clip(child + step, 0, n_choices - 1)
    return np.where(mutate, np.where(rng.random((n, G)) < 0.7, moved, resample), child)


def offspring(pop: np.ndarray, F: np.ndarray, violation: np.ndarray, n: int, n_choices: np.ndarray,
              rng: np.random.Generator, population: int = 50) -> np.ndarray:
    """``n`` children of the ``population`` best plans of ``pop`` (by constrained rank, then
    crowding), chosen by binary tournaments: one NSGA-II generation, O(n x G)."""
    ranks, crowd = _rank(F, violation)
    keep = np.lexsort((-crowd, ranks))[:population]
    pop, ranks, crowd = pop[keep], ranks[keep], crowd[keep]
    a, b = rng.integers(0, len(pop), (2, n))
    better = (ranks[a] < ranks[b]) | ((ranks[a] == ranks[b]) & (crowd[a] > crowd[b]))
    parents = np.where(better, a, b)
    return _vary(pop, parents, rng.integers(0, len(pop), n), n_choices, rng)


def nsga2(evaluate: Evaluate, n_choices: np.ndarray, pop_size: int = 200, generations: int = 300, seed: int = 0,
          init: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns the final population (genomes, objectives, violations)."""
    rng = np.random.default_rng(seed)
    G = len(n_choices)
    pop = rng.integers(0, n_choices, size=(pop_size, G))
    if init is not None and len(init):
        pop[: min(len(init), pop_size)] = init[:pop_size]
    F, V = evaluate(pop)
    for _ in range(generations):
        ranks, crowd = _rank(F, V)
        a, b = rng.integers(0, pop_size, (2, pop_size))
        better = (ranks[a] < ranks[b]) | ((ranks[a] == ranks[b]) & (crowd[a] > crowd[b]))
        parents = np.where(better, a, b)
        child = _vary(pop, parents, parents[rng.permutation(pop_size)], n_choices, rng)
        CF, CV = evaluate(child)
        allg, allF, allV = np.vstack([pop, child]), np.vstack([F, CF]), np.concatenate([V, CV])
        ranks, crowd = _rank(allF, allV)
        keep = np.lexsort((-crowd, ranks))[:pop_size]
        pop, F, V = allg[keep], allF[keep], allV[keep]
    return pop, F, V


def hypervolume_2d(F: np.ndarray, reference: tuple[float, float]) -> float:
    """Area dominated by the points ``F`` ([N, 2], both minimised) and bounded by ``reference``.
    Points not strictly better than the reference in both objectives add nothing."""
    F = np.asarray(F, float).reshape(-1, 2)
    F = F[(F[:, 0] < reference[0]) & (F[:, 1] < reference[1])]
    area, best_y = 0.0, reference[1]
    for x, y in F[np.lexsort((F[:, 1], F[:, 0]))]:  # by the first objective, ties by the second
        if y < best_y:
            area += (reference[0] - x) * (best_y - y)
            best_y = y
    return area
