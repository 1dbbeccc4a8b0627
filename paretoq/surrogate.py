"""The surrogate: a scikit-learn regressor predicting a plan's KL, and the proposals NSGA-II finds on it.

A plan is a genome: for each group, an index into its sorted bit choices. The prior is additive:
a plan's KL is close to the sum of its groups' measured sensitivities (each group's KL alone at
its width). Verified plans correct it: a ridge regression on the additive estimate plus one-hot
(group, width) indicators learns, for each group and width, how much that choice really costs
*inside* whole plans (interactions, and the noise of sensitivities measured on fewer tokens). The
ridge penalty shrinks corrections towards zero, so with few verified plans the prediction stays
the measured prior. GPTQ's reconstruction loss and the probe features (usage) enter as extra
columns, normalised by constants fixed at fit time (a plan's prediction never depends on what is
scored beside it). Every column is a sum over groups, so the fitted model is itself additive: one
table ``[G, C]`` of per-(group, width) costs (``Surrogate.table``). Predicting is a gather; the
design is a sparse matrix (one non-zero per group per plan), so a fit costs O(plans x G).

Two kinds of proposals come from it. Global ones: being additive, the surrogate's optimum under any
budget is an exact multiple-choice knapsack (``paretoq.knapsack``): its optimum at the budget and
at budgets spread below it (the exact predicted front), each distinct from every verified plan.
Local ones (a trust region): plans one exchange away from the best verified plan, ranked by a fit
that weighs verified plans by their closeness to it. Near a good plan the landscape is flat and
interactions decide; a fit dominated by far-away plans cannot see them, a local one can. The
exchanges are scored as differences of table entries, O(G x FUNDING_DOWNS^2) numbers, and only the
few proposed are built as genomes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix, hstack
from sklearn.linear_model import Ridge

from paretoq import knapsack as mckp
from paretoq.space import Group

MIN_FIT = 8  # verified plans needed before the regressor replaces the additive estimate
EPS = 1e-9
# Trust-region radius, in groups changed: a verified plan that differs from the incumbent in d
# groups weighs exp(-d / RADIUS) in the local fit. Exchanges change 1-3 groups, so their own
# verified neighbours weigh 0.5-0.8 and plans from elsewhere in the space (tens of groups away)
# next to nothing; the unit is groups, so it does not depend on the model's size.
RADIUS = 4.0
SOLVE_SECONDS = 5.0  # per global proposal: HiGHS's best plan after this long if it has not proven one optimal
FUNDING_DOWNS = 24  # cheapest down-moves considered for funding an upgrade (with one or two of them)


@dataclass
class Tables:
    groups: list[Group]
    n_choices: np.ndarray  # [G]
    bits: np.ndarray  # [G, C] budget bits of each choice (its width, or its ggml type's size; padded with the last)
    params: np.ndarray  # [G]
    sens: np.ndarray  # [G, C] measured KL of the group alone
    loss: np.ndarray  # [G, C] GPTQ loss relative to the lowest width
    usage: np.ndarray  # [G] mean usage of the group's components (1 for non-experts)
    kind: np.ndarray  # [G] kind index
    layer: np.ndarray  # [G] layer index

    @property
    def valid(self) -> np.ndarray:
        return np.arange(self.bits.shape[1])[None, :] < self.n_choices[:, None]

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
        bits[i] = [g.cost(b) for b in choices]  # what each choice costs in the budget
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
        t = tables
        # The three dense columns, per (group, width): each a plan's sum over its groups' entries.
        self._columns = np.stack([t.sens, t.sens * t.usage[:, None], t.loss * (t.params / t.params.sum())[:, None]])
        self._norm = np.ones(3)  # fixed at fit time
        self._table = t.sens.copy()  # the prior: the additive sensitivity
        self._intercept = 0.0

    def _design(self, genomes: np.ndarray):
        """Sparse design: the three dense columns (normalised as at fit time), then one-hot (group, width)."""
        t = self.tables
        genomes = np.atleast_2d(genomes)
        N, (G, C) = len(genomes), t.sens.shape
        dense = self._columns[:, np.arange(G), genomes].sum(-1).T / self._norm  # [N, 3]
        onehot = csr_matrix((np.ones(N * G), (np.repeat(np.arange(N), G), (genomes + np.arange(G) * C).ravel())),
                            shape=(N, G * C))
        return hstack([csr_matrix(dense), onehot]).tocsr()

    def fit(self, genomes: np.ndarray, kl: np.ndarray, weights: np.ndarray | None = None) -> Surrogate:
        self.fitted_on = len(kl)
        t = self.tables
        if len(kl) < MIN_FIT:
            self.model, self._table, self._intercept, self.scale = None, t.sens.copy(), 0.0, 1.0
            return self
        genomes = np.atleast_2d(genomes)
        self.scale = float(np.median(kl)) or 1.0
        G = len(t.groups)
        raw = self._columns[:, np.arange(G), genomes].sum(-1).T  # [N, 3]
        self._norm = np.maximum(np.abs(raw).max(0), EPS)
        self._norm[0] = self.scale  # the additive estimate in units of the measured KL
        self.model = Ridge(alpha=self.alpha, solver="sparse_cg", tol=1e-6)
        self.model.fit(self._design(genomes), np.asarray(kl) / self.scale, sample_weight=weights)
        coef = self.model.coef_
        table = np.tensordot(coef[:3] / self._norm, self._columns, axes=1) + coef[3:].reshape(t.sens.shape)
        self._table, self._intercept = table * self.scale, float(self.model.intercept_) * self.scale
        return self

    def fit_local(self, genomes: np.ndarray, kl: np.ndarray, incumbent: np.ndarray) -> Surrogate:
        """Fit weighted by closeness to ``incumbent`` (see RADIUS)."""
        distance = (np.atleast_2d(genomes) != incumbent).sum(-1)
        return self.fit(genomes, kl, weights=np.exp(-distance / RADIUS))

    @property
    def table(self) -> np.ndarray:
        """[G, C]: the predicted KL of a plan is the sum of its choices' entries (plus a constant)."""
        return self._table

    def predict(self, genomes: np.ndarray) -> np.ndarray:
        genomes = np.atleast_2d(genomes)
        raw = self._table[np.arange(len(self.tables.groups)), genomes].sum(-1) + self._intercept
        return np.maximum(raw, 0.0)

    def propose(self, n: int, budget: float, seen: set[bytes], lowest: float | None = None) -> list[tuple[np.ndarray, float]]:
        """Up to ``n`` unseen genomes within the budget: the surrogate's exact optima at the budget
        and at budgets spread evenly below it down to ``lowest`` (default: the smallest plan, at
        least 2 bits), the exact predicted front; an optimum already verified is skipped. (Excluding
        verified plans by no-good cuts gives the next best distinct plan, but HiGHS needs minutes
        per solve with them at a few hundred groups; the local proposals cover that neighbourhood.)"""
        t = self.tables
        lo = float(t.avg_bits(np.zeros((1, len(t.groups)), dtype=np.int64))[0]) if lowest is None else lowest
        budgets = [budget] + list(np.linspace(budget, max(lo, 2.0), max(n, 1) + 1)[1:-1] if n > 1 else [])
        out, seen = [], set(seen)
        for b in budgets[:n]:
            genome = mckp.solve(self._table, t.bits, t.params, t.n_choices, b, time_limit=SOLVE_SECONDS)
            if genome is None or genome.tobytes() in seen:
                continue
            seen.add(genome.tobytes())
            out.append((genome, float(self.predict(genome)[0])))
        return out

    def propose_local(self, n: int, budget: float, incumbent: np.ndarray, seen: set[bytes]) -> list[tuple[np.ndarray, float]]:
        """Up to ``n`` unseen plans within the budget one exchange away from ``incumbent``, lowest
        predicted KL first."""
        moves, delta = exchanges(self.tables, incumbent, budget, self._table)
        base = float(self.predict(incumbent)[0])
        out, seen = [], set(seen)
        for m in np.argsort(delta, kind="stable"):
            cand = apply_move(incumbent, moves[m])
            key = cand.astype(np.int64).tobytes()
            if key not in seen:
                seen.add(key)
                out.append((cand, max(base + float(delta[m]), 0.0)))
                if len(out) == n:
                    break
        return out


def apply_move(genome: np.ndarray, move: np.ndarray) -> np.ndarray:
    """``move``: (group a width up, group a width down, another group a width down), -1 where unused."""
    c = np.asarray(genome, dtype=np.int64).copy()
    up, d1, d2 = (int(x) for x in move)
    if up >= 0:
        c[up] += 1
    for d in (d1, d2):
        if d >= 0:
            c[d] -= 1
    return c


def exchanges(tables: Tables, genome: np.ndarray, budget: float, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every plan within the budget one exchange from ``genome``, as moves ([M, 3] int32, see
    ``apply_move``) and their change of the additive ``table``'s sum ([M]): one group a width down;
    one group a width up (alone if the slack allows, else funded by one or two of the FUNDING_DOWNS
    down-moves the table finds cheapest). At most G * (2 + FUNDING_DOWNS + FUNDING_DOWNS^2 / 2)
    moves, each scored in O(1): linear in G (16,000 groups: 4.7M moves, about 100 MB)."""
    t = tables
    genome = np.asarray(genome, dtype=np.int64)
    G = len(genome)
    rows = np.arange(G)
    total = t.params.sum()
    slack = budget * total + 1e-9 * total - (t.params * t.bits[rows, genome]).sum()  # bit-parameters left
    now = table[rows, genome]
    up = np.flatnonzero(genome + 1 < t.n_choices)
    down = np.flatnonzero(genome > 0)
    d_up = table[up, genome[up] + 1] - now[up]
    w_up = t.params[up] * (t.bits[up, genome[up] + 1] - t.bits[up, genome[up]])
    d_down = table[down, genome[down] - 1] - now[down]
    w_down = t.params[down] * (t.bits[down, genome[down] - 1] - t.bits[down, genome[down]])  # <= 0
    moves, deltas = [], []

    def add(u, d1, d2, delta, ok):
        if ok.any():
            moves.append(np.stack([u[ok], d1[ok], d2[ok]], 1).astype(np.int32))
            deltas.append(delta[ok])

    none_d, none_u = np.full(len(down), -1), np.full(len(up), -1)
    add(none_d, down, none_d, d_down, w_down <= slack)
    add(up, none_u, none_u, d_up, w_up <= slack)
    cheap = np.argsort(d_down, kind="stable")[:FUNDING_DOWNS]  # indices into down
    if len(cheap) and len(up):
        i, j = np.repeat(np.arange(len(up), dtype=np.int32), len(cheap)), np.tile(cheap, len(up))
        ok = (up[i] != down[j]) & (w_up[i] + w_down[j] <= slack)
        add(up[i], down[j], np.full(len(i), -1), d_up[i] + d_down[j], ok)
        a, b = np.triu_indices(len(cheap), 1)
        pa, pb = cheap[a], cheap[b]
        i = np.repeat(np.arange(len(up), dtype=np.int32), len(pa))
        ja, jb = np.tile(pa, len(up)), np.tile(pb, len(up))
        ok = (up[i] != down[ja]) & (up[i] != down[jb]) & (w_up[i] + w_down[ja] + w_down[jb] <= slack)
        add(up[i], down[ja], down[jb], d_up[i] + d_down[ja] + d_down[jb], ok)
    if not moves:
        return np.zeros((0, 3), dtype=np.int32), np.zeros(0)
    return np.concatenate(moves), np.concatenate(deltas)


def neighbours(tables: Tables, genome: np.ndarray, budget: float, table: np.ndarray) -> np.ndarray:
    """The exchanges of ``genome`` as distinct genomes (materialised: for tests and small G)."""
    moves, _ = exchanges(tables, genome, budget, table)
    if not len(moves):
        return np.zeros((0, len(genome)), dtype=np.int64)
    return np.unique(np.array([apply_move(genome, m) for m in moves]), axis=0)


def kendall_tau(predicted: list[float], measured: list[float]) -> float:
    from scipy.stats import kendalltau

    if len(predicted) < 3:
        return float("nan")
    return float(kendalltau(predicted, measured).statistic)
