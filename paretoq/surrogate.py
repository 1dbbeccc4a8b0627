"""The surrogate: a scikit-learn regressor predicting a plan's KL, and the proposals NSGA-II finds on it.

A plan is a genome: for each group, an index into its sorted bit choices. The prior is additive:
a plan's KL is close to the sum of its groups' measured sensitivities (each group's KL alone at
its width). Verified plans correct it: a ridge regression on the additive estimate plus one-hot
(group, width) indicators learns, for each group and width, how much that choice really costs
*inside* whole plans (interactions, and the noise of sensitivities measured on fewer tokens). The
ridge penalty shrinks corrections towards zero, so with few verified plans the prediction stays
the measured prior. GPTQ's reconstruction loss and the probe features (usage) enter as extra
columns. Being additive per group, the model is evaluated on a whole population with one gather.

Two kinds of proposals come from it. Global ones: NSGA-II on (predicted KL, avg bits), spread along
the front. Local ones (a trust region): plans one exchange away from the best verified plan, ranked
by a fit that weighs verified plans by their closeness to it. Near a good plan the landscape is
flat and interactions decide; a fit dominated by far-away plans cannot see them, a local one can.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import Ridge

from paretoq.nsga import nsga2
from paretoq.space import Group

MIN_FIT = 8  # verified plans needed before the regressor replaces the additive estimate
EPS = 1e-9
# Trust-region radius, in groups changed: a verified plan that differs from the incumbent in d
# groups weighs exp(-d / RADIUS) in the local fit. Exchanges change 1-3 groups, so their own
# verified neighbours weigh 0.5-0.8 and plans from elsewhere in the space (tens of groups away)
# next to nothing; the unit is groups, so it does not depend on the model's size.
RADIUS = 4.0
FUNDING_DOWNS = 24  # cheapest down-moves considered for funding an upgrade with two of them


@dataclass
class Tables:
    groups: list[Group]
    n_choices: np.ndarray  # [G]
    bits: np.ndarray  # [G, C] bit width of each choice (padded with the last)
    params: np.ndarray  # [G]
    sens: np.ndarray  # [G, C] measured KL of the group alone
    loss: np.ndarray  # [G, C] GPTQ loss relative to the lowest width
    usage: np.ndarray  # [G] mean usage of the group's components (1 for non-experts)
    kind: np.ndarray  # [G] kind index
    layer: np.ndarray  # [G] layer index

    def genome(self, bits: dict[str, int]) -> np.ndarray:
        return np.array([g.choices.index(bits[g.name]) for g in self.groups])

    def plan_bits(self, genome: np.ndarray) -> dict[str, int]:
        return {g.name: g.choices[int(i)] for g, i in zip(self.groups, genome)}

    def avg_bits(self, genomes: np.ndarray) -> np.ndarray:
        b = self.bits[np.arange(len(self.groups)), genomes]
        return (b * self.params).sum(-1) / self.params.sum()


def build_tables(groups: list[Group], sensitivity: dict[str, dict[int, float]], loss: dict[tuple[str, int], float],
                 usage: dict[str, float]) -> Tables:
    G, C = len(groups), max(len(g.choices) for g in groups)
    bits, sens, rel = np.zeros((G, C)), np.zeros((G, C)), np.zeros((G, C))
    kinds = sorted({g.kind for g in groups})
    layers = sorted({g.layer for g in groups})
    for i, g in enumerate(groups):
        choices = list(g.choices) + [g.choices[-1]] * (C - len(g.choices))
        bits[i] = choices
        sens[i] = [max(sensitivity[g.name][b], 0.0) for b in choices]
        raw = [np.nansum([loss.get((k, b), np.nan) for k in g.keys]) for b in choices]
        rel[i] = np.array(raw) / (raw[0] if raw[0] > 0 else 1.0)
    return Tables(groups, np.array([len(g.choices) for g in groups]), bits, np.array([g.params for g in groups], float),
                  sens, rel, np.array([usage.get(g.name, 1.0) for g in groups]),
                  np.array([kinds.index(g.kind) for g in groups]), np.array([layers.index(g.layer) for g in groups]))


class Surrogate:
    def __init__(self, tables: Tables, alpha: float = 10.0):
        self.tables = tables
        self.model = None
        self.alpha = alpha
        self.scale = 1.0
        self.fitted_on = 0
        G, C = tables.sens.shape
        self._offsets = np.arange(G) * C

    def _design(self, genomes: np.ndarray) -> np.ndarray:
        t = self.tables
        genomes = np.atleast_2d(genomes)
        idx = (np.arange(len(t.groups)), genomes)
        onehot = np.zeros((len(genomes), t.sens.size))
        np.put_along_axis(onehot, genomes + self._offsets, 1.0, axis=1)
        additive = t.sens[idx].sum(-1)
        extra = np.column_stack([(t.sens[idx] * t.usage).sum(-1), (t.loss[idx] * t.params).sum(-1) / t.params.sum()])
        return np.column_stack([additive / self.scale, extra / np.maximum(np.abs(extra).max(0), EPS), onehot])

    def fit(self, genomes: np.ndarray, kl: np.ndarray, weights: np.ndarray | None = None) -> Surrogate:
        self.fitted_on = len(kl)
        if len(kl) < MIN_FIT:
            self.model = None
            return self
        self.scale = float(np.median(kl)) or 1.0
        self.model = Ridge(alpha=self.alpha)
        self.model.fit(self._design(genomes), np.asarray(kl) / self.scale, sample_weight=weights)
        return self

    def fit_local(self, genomes: np.ndarray, kl: np.ndarray, incumbent: np.ndarray) -> Surrogate:
        """Fit weighted by closeness to ``incumbent`` (see RADIUS)."""
        distance = (np.atleast_2d(genomes) != incumbent).sum(-1)
        return self.fit(genomes, kl, weights=np.exp(-distance / RADIUS))

    def predict(self, genomes: np.ndarray) -> np.ndarray:
        genomes = np.atleast_2d(genomes)
        if self.model is None:
            idx = (np.arange(len(self.tables.groups)), genomes)
            return self.tables.sens[idx].sum(-1)
        return np.maximum(self.model.predict(self._design(genomes)) * self.scale, 0.0)

    def propose(self, n: int, budget: float, seen: set[bytes], seed: int = 0, init: np.ndarray | None = None,
                generations: int = 300, pop_size: int = 200) -> list[tuple[np.ndarray, float]]:
        """Up to ``n`` unseen genomes within the budget from NSGA-II on (predicted KL, avg bits): half
        the lowest predicted KL, half spread evenly along the predicted front."""
        t = self.tables

        def evaluate(pop):
            avg = t.avg_bits(pop)
            return np.column_stack([self.predict(pop), avg]), np.maximum(avg - budget, 0)

        pop, F, V = nsga2(evaluate, t.n_choices, pop_size, generations, seed, init)
        ok = [i for i in np.argsort(F[:, 0]) if V[i] <= 0]
        unique, keys = [], set(seen)
        for i in ok:
            k = pop[i].astype(np.int64).tobytes()
            if k not in keys:
                keys.add(k)
                unique.append(i)
        best = unique[: (n + 1) // 2]
        rest = sorted((i for i in unique if i not in best), key=lambda i: F[i, 1])
        if rest and n - len(best) > 0:
            picks = np.linspace(0, len(rest) - 1, min(n - len(best), len(rest))).round().astype(int)
            best += [rest[j] for j in sorted(set(picks))]
        return [(pop[i], float(F[i, 0])) for i in best[:n]]

    def propose_local(self, n: int, budget: float, incumbent: np.ndarray, seen: set[bytes]) -> list[tuple[np.ndarray, float]]:
        """Up to ``n`` unseen plans within the budget one exchange away from ``incumbent``, lowest
        predicted KL first."""
        cands = neighbours(self.tables, incumbent, budget, self.predict)
        if not len(cands):
            return []
        pred = self.predict(cands)
        out, seen = [], set(seen)
        for i in np.argsort(pred, kind="stable"):
            key = cands[i].astype(np.int64).tobytes()
            if key not in seen:
                seen.add(key)
                out.append((cands[i], float(pred[i])))
                if len(out) == n:
                    break
        return out


def neighbours(tables: Tables, genome: np.ndarray, budget: float, predict) -> np.ndarray:
    """Plans within the budget one exchange from ``genome``: one group a width down; one group a
    width up (alone if the slack allows, else funded by one group a width down, or by two of the
    FUNDING_DOWNS down-moves ``predict`` finds cheapest). Bounded by G^2 + G * FUNDING_DOWNS^2 / 2
    candidates, so large models stay cheap."""
    genome = np.asarray(genome)
    G = len(genome)
    ups = [i for i in range(G) if genome[i] + 1 < tables.n_choices[i]]
    downs = [i for i in range(G) if genome[i] > 0]

    def moved(changes):
        c = genome.copy()
        for i, step in changes:
            c[i] += step
        return c

    single_down = [moved([(i, -1)]) for i in downs]
    cands = single_down + [moved([(i, 1)]) for i in ups]
    cands += [moved([(i, 1), (j, -1)]) for i in ups for j in downs if i != j]
    if single_down:
        cost = predict(np.array(single_down))
        cheap = [downs[k] for k in np.argsort(cost, kind="stable")[:FUNDING_DOWNS]]
        cands += [moved([(i, 1), (j, -1), (k, -1)]) for i in ups
                  for a, j in enumerate(cheap) for k in cheap[a + 1:] if i not in (j, k)]
    if not cands:
        return np.zeros((0, G), dtype=genome.dtype)
    pop = np.unique(np.array(cands), axis=0)
    return pop[tables.avg_bits(pop) <= budget + 1e-9]


def kendall_tau(predicted: list[float], measured: list[float]) -> float:
    from scipy.stats import kendalltau

    if len(predicted) < 3:
        return float("nan")
    return float(kendalltau(predicted, measured).statistic)
