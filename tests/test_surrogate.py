import numpy as np

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
    props = s.propose(10, budget=3.0, seen=seen, generations=40, pop_size=60)
    assert 0 < len(props) <= 10
    keys = {g.astype(np.int64).tobytes() for g, _ in props}
    assert len(keys) == len(props) and not keys & seen
    assert all(tables.avg_bits(g[None])[0] <= 3.0 + 1e-9 for g, _ in props)
