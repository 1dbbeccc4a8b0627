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


def test_hypervolume_2d_by_hand_and_against_a_grid():
    from paretoq.nsga import hypervolume_2d

    # Staircase (1,3), (2,2), (3,1) under reference (4,4): 3*1 + 2*1 + 1*1 + ... by hand = 6.
    assert hypervolume_2d(np.array([[1, 3], [2, 2], [3, 1]]), (4, 4)) == 6.0
    # Dominated points, duplicates and points beyond the reference change nothing.
    assert hypervolume_2d(np.array([[1, 3], [2, 2], [3, 1], [3, 3], [2, 2], [5, 0], [0, 5]]), (4, 4)) == 6.0
    assert hypervolume_2d(np.zeros((0, 2)), (1, 1)) == 0.0
    # Random points against a Monte Carlo-free grid count of the dominated cells.
    rng = np.random.default_rng(0)
    P = rng.integers(0, 20, (15, 2)).astype(float)
    xs, ys = np.meshgrid(np.arange(20) + 0.5, np.arange(20) + 0.5, indexing="ij")
    cells = np.stack([xs.ravel(), ys.ravel()], 1)
    dominated = ((P[None, :, 0] <= cells[:, None, 0]) & (P[None, :, 1] <= cells[:, None, 1])).any(1)
    assert hypervolume_2d(P, (20, 20)) == dominated.sum()
