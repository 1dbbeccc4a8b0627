import numpy as np
import pytest

from paretoq.space import Group
from paretoq.surrogate import Surrogate, build_tables, kendall_tau


def _groups(n=12):
    return [Group(f"g{i}", "expert", i % 3, (f"k{i}",), 100 * (1 + i % 4), (2, 3, 4, 8)) for i in range(n)]


def test_prior_is_the_additive_sensitivity_and_fitting_learns_interactions():
    groups = _groups()
    rng = np.random.default_rng(0)
    sens = {g.name: {b: float(rng.random()) * 2.0 ** -b for b in g.choices} for g in groups}
    tables = build_tables(groups, sens, {}, {})
    s = Surrogate(tables)
    genomes = rng.integers(0, 4, size=(200, len(groups)))
    additive = tables.sens[np.arange(len(groups)), genomes].sum(-1)
    np.testing.assert_allclose(s.predict(genomes), additive)
    # the truth departs from the prior: group 0 costs 5x its measured sensitivity inside plans
    truth = additive + 4 * tables.sens[0, genomes[:, 0]]
    s.fit(genomes[:150], truth[:150])
    tau_fit = kendall_tau(list(s.predict(genomes[150:])), list(truth[150:]))
    tau_prior = kendall_tau(list(additive[150:]), list(truth[150:]))
    assert tau_fit > 0.9 and tau_fit > tau_prior


def test_proposals_are_within_budget_unseen_and_distinct():
    groups = _groups()
    sens = {g.name: {b: 2.0 ** -b for b in g.choices} for g in groups}
    tables = build_tables(groups, sens, {}, {})
    s = Surrogate(tables)
    seen = {np.zeros(len(groups), dtype=np.int64).tobytes()}
    props = s.propose(10, budget=3.0, seen=seen)
    assert 0 < len(props) <= 10
    keys = {g.astype(np.int64).tobytes() for g, _ in props}
    assert len(keys) == len(props) and not keys & seen
    assert all(tables.avg_bits(g[None])[0] <= 3.0 + 1e-9 for g, _ in props)


def _exchanges_by_brute_force(tables, genome, budget):
    """Every plan within the budget reachable by one step down, one step up, one up and one down,
    or one up and two down (distinct groups), enumerated naively."""
    import itertools

    G, out = len(genome), set()
    ups = [i for i in range(G) if genome[i] + 1 < tables.n_choices[i]]
    downs = [i for i in range(G) if genome[i] > 0]
    moves = [[(i, -1)] for i in downs] + [[(i, 1)] for i in ups]
    moves += [[(i, 1), (j, -1)] for i in ups for j in downs if i != j]
    moves += [[(i, 1), (j, -1), (k, -1)] for i in ups for j, k in itertools.combinations(downs, 2) if i not in (j, k)]
    for m in moves:
        c = genome.copy()
        for i, s in m:
            c[i] += s
        if tables.avg_bits(c[None])[0] <= budget + 1e-9:
            out.add(tuple(c))
    return out


def test_neighbours_are_exactly_the_exchanges_within_budget():
    from paretoq.surrogate import neighbours

    groups = _groups(9)  # few enough that all down-moves fund (FUNDING_DOWNS >= G)
    sens = {g.name: {b: 2.0 ** -b for b in g.choices} for g in groups}
    tables = build_tables(groups, sens, {}, {})
    s = Surrogate(tables)
    genome = np.array([1, 0, 2, 3, 1, 1, 0, 2, 1])
    budget = float(tables.avg_bits(genome[None])[0])  # no slack: every upgrade must be funded
    got = {tuple(c) for c in neighbours(tables, genome, budget, s.table)}
    assert got == _exchanges_by_brute_force(tables, genome, budget) and got


def test_local_fit_learns_what_the_prior_misses_around_the_incumbent():
    from paretoq.surrogate import neighbours

    groups = _groups(9)
    rng = np.random.default_rng(3)
    cost = np.sort(rng.random((9, 4)), axis=1)[:, ::-1] * 1e-3  # more bits, less KL
    sens = {g.name: {b: float(cost[i, j]) for j, b in enumerate(g.choices)} for i, g in enumerate(groups)}
    tables = build_tables(groups, sens, {}, {})
    # The measured sensitivities miss that group 4 at its lowest width costs ten times more inside
    # plans; verified plans around the incumbent (where group 4 sits at that width) reveal it.
    truth = lambda pop: cost[np.arange(9), pop].sum(-1) + 9 * cost[4, 0] * (pop[:, 4] == 0)  # noqa: E731
    incumbent = np.array([1, 1, 0, 2, 0, 1, 1, 1, 1])
    budget = float(tables.avg_bits(incumbent[None])[0])
    prior = Surrogate(tables)
    near = neighbours(tables, incumbent, budget, prior.table)
    verified = np.vstack([incumbent[None], near[rng.permutation(len(near))[:25]], rng.integers(0, 4, (40, 9))])
    seen = {p.astype(np.int64).tobytes() for p in verified}
    local = Surrogate(tables).fit_local(verified, truth(verified), incumbent)
    props = local.propose_local(3, budget, incumbent, seen)
    assert len(props) == 3
    assert all(p.astype(np.int64).tobytes() not in seen for p, _ in props)
    assert [pred for _, pred in props] == sorted(pred for _, pred in props)
    assert props[0][0][4] > 0  # the upgrade the data asks for
    unseen = np.array([c for c in near if c.astype(np.int64).tobytes() not in seen])
    prior_pick = unseen[np.argmin(prior.predict(unseen))]
    assert truth(props[0][0][None])[0] < truth(prior_pick[None])[0]


def test_a_prediction_does_not_depend_on_what_is_scored_beside_it_and_the_fit_is_additive():
    groups = _groups()
    rng = np.random.default_rng(1)
    sens = {g.name: {b: float(rng.random()) * 2.0 ** -b for b in g.choices} for g in groups}
    loss = {(g.keys[0], b): float(rng.random()) for g in groups for b in g.choices}
    tables = build_tables(groups, sens, loss, {g.name: float(rng.random()) for g in groups})
    genomes = rng.integers(0, 4, size=(60, len(groups)))
    s = Surrogate(tables).fit(genomes, rng.random(60) * 1e-3)
    one = genomes[:1]
    extreme = np.zeros((1, len(groups)), dtype=np.int64)  # a batch partner with extreme extra columns
    assert s.predict(one)[0] == s.predict(np.vstack([one, extreme, genomes[5:]]))[0]
    raw = s.table[np.arange(len(groups)), genomes].sum(-1) + s._intercept
    np.testing.assert_allclose(s.predict(genomes), np.maximum(raw, 0))


def test_the_global_proposal_is_the_exact_optimum_of_the_fitted_model():
    import itertools

    groups = _groups(6)
    rng = np.random.default_rng(2)
    sens = {g.name: {b: float(rng.random()) * 2.0 ** -b for b in g.choices} for g in groups}
    tables = build_tables(groups, sens, {}, {})
    genomes = rng.integers(0, 4, size=(40, 6))
    s = Surrogate(tables).fit(genomes, tables.sens[np.arange(6), genomes].sum(-1) * (1 + 0.3 * rng.random(40)))
    (best, pred), *_ = s.propose(3, budget=3.0, seen=set())
    grid = np.array(list(itertools.product(range(4), repeat=6)))
    ok = grid[tables.avg_bits(grid) <= 3.0 + 1e-9]
    assert pred == pytest.approx(s.predict(ok).min(), rel=1e-9)
