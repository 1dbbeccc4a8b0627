import itertools

import numpy as np
import pytest

from paretoq import baselines as bl
from paretoq import knapsack as mckp
from paretoq.space import Group, avg_bits


def _brute_force(cost, bits, params, n_choices, budget):
    """The least cost over every genome within the budget (None if none fits), enumerated."""
    best = None
    total = params.sum()
    for genome in itertools.product(*[range(n) for n in n_choices]):
        g = np.array(genome)
        if (params * bits[np.arange(len(g)), g]).sum() <= budget * total + 1e-9 * total:
            v = cost[np.arange(len(g)), g].sum()
            best = v if best is None else min(best, v)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_equals_the_brute_force_optimum_on_random_instances(seed):
    rng = np.random.default_rng(seed)
    G = int(rng.integers(1, 7))
    widths = (2, 3, 4, 8)
    n_choices = rng.integers(1, 5, G)
    bits = np.array([[widths[min(c, n - 1)] for c in range(4)] for n in n_choices], float)
    # sizes over several orders of magnitude, as real models mix a 7168-wide projection with a small expert
    params = np.round(10 ** rng.uniform(0, 4, G))
    cost = rng.random((G, 4)) * 10 ** rng.uniform(-6, 0, (G, 1))
    if seed % 2:  # half the instances monotone (more bits, less cost), as sensitivities mostly are
        cost = -np.sort(-cost, axis=1)
    budget = float(rng.uniform(2.0, 8.0))
    got = mckp.solve(cost, bits, params, n_choices, budget)
    want = _brute_force(cost, bits, params, n_choices, budget)
    if want is None:
        assert got is None
        return
    assert got is not None and (got < n_choices).all()
    assert (params * bits[np.arange(G), got]).sum() <= budget * params.sum() * (1 + 1e-12)
    assert cost[np.arange(G), got].sum() == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_two_groups_of_1_and_10_parameters():
    """The greedy by KL saved per added bit buys the small group's upgrade first (ratio 0.5 per
    bit-parameter against 0.2) and then cannot afford the large one's: KL 5. The optimum upgrades
    the large group: KL 1."""
    groups = [Group("small", "expert", 0, ("a",), 1, (2, 4)), Group("large", "expert", 0, ("b",), 10, (2, 4))]
    sens = {"small": {2: 1.0, 4: 0.0}, "large": {2: 5.0, 4: 0.0}}
    budget = (1 * 2 + 10 * 4) / 11  # room for the large group's upgrade, not for both
    bits = bl.knapsack(groups, sens, budget)
    assert bits == {"small": 2, "large": 4}
    assert sum(sens[g][b] for g, b in bits.items()) == 1.0
    assert avg_bits(groups, bits) <= budget + 1e-12


def test_exclusions_give_the_next_best_distinct_plan_and_infeasible_budgets_give_none():
    rng = np.random.default_rng(0)
    G = 5
    cost = -np.sort(-rng.random((G, 4)), axis=1)
    bits = np.tile(np.array([2.0, 3, 4, 8]), (G, 1))
    params, n = np.full(G, 100.0), np.full(G, 4)
    first = mckp.solve(cost, bits, params, n, 3.0)
    second = mckp.solve(cost, bits, params, n, 3.0, exclude=[first])
    assert second is not None and not np.array_equal(first, second)
    assert cost[np.arange(G), second].sum() >= cost[np.arange(G), first].sum()
    # brute force: the second best within the budget
    values = sorted(cost[np.arange(G), np.array(g)].sum() for g in itertools.product(range(4), repeat=G)
                    if bits[0, list(g)].mean() <= 3.0 + 1e-9)
    assert cost[np.arange(G), second].sum() == pytest.approx(values[1])
    assert mckp.solve(cost, bits, params, n, 1.5) is None


def test_large_instances_are_quick_and_within_budget():
    import time

    rng = np.random.default_rng(1)
    G = 16000
    cost = -np.sort(-rng.random((G, 4)), axis=1) * rng.random((G, 1))
    bits = np.tile(np.array([2.0, 3, 4, 8]), (G, 1))
    params = rng.choice([768 * 2048 * 3, 2048 * 4096, 7168 * 2048], G).astype(float)
    t = time.time()
    genome = mckp.solve(cost, bits, params, np.full(G, 4), 3.0)
    assert time.time() - t < 30
    assert (params * bits[np.arange(G), genome]).sum() <= 3.0 * params.sum() * (1 + 1e-12)
