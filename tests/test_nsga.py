import numpy as np

from paretoq.nsga import nondominated_ranks, nsga2


def test_ranks_by_hand():
    F = np.array([[1, 5], [2, 2], [5, 1], [3, 3], [4, 4], [2, 2]])
    assert nondominated_ranks(F).tolist() == [0, 0, 0, 1, 2, 0]


def test_finds_the_constrained_optimum_of_a_separable_problem():
    """Minimise sum(cost_i[x_i]) and sum(x_i) with sum(x_i) <= 10 over 8 genes of 4 levels."""
    rng = np.random.default_rng(0)
    cost = np.sort(rng.random((8, 4)), axis=1)[:, ::-1]  # more level, less cost

    def evaluate(pop):
        size = pop.sum(-1).astype(float)
        return np.column_stack([cost[np.arange(8), pop].sum(-1), size]), np.maximum(size - 10, 0)

    pop, F, V = nsga2(evaluate, np.full(8, 4), pop_size=60, generations=150, seed=1)
    assert (V == 0).all()
    # brute force over all 4^8 genomes for the best cost within the constraint
    grid = np.stack(np.meshgrid(*[np.arange(4)] * 8, indexing="ij"), -1).reshape(-1, 8)
    ok = grid.sum(-1) <= 10
    best = cost[np.arange(8), grid[ok]].sum(-1).min()
    assert F[:, 0].min() <= best + 1e-9
