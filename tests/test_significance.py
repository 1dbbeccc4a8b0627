import itertools

import numpy as np
import pytest
import torch

from paretoq.probes.significance import (
    ALPHA, expert_significance, fit_long_tail, jenks_two_classes, token_utilization,
)


def _zipf_tokens(vocab=200, total=20000, beta=1.1, seed=0):
    ranks = np.arange(1, vocab + 1)
    p = ranks ** -beta
    p /= p.sum()
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.choice(vocab, size=total, p=p))  # token id = rank - 1


def test_long_tail_fit_recovers_beta_and_ranks_by_frequency():
    tokens = _zipf_tokens()
    fit, ranks = fit_long_tail(tokens)
    assert fit.beta == pytest.approx(1.1, abs=0.15)
    counts = torch.bincount(tokens)
    assert ranks[tokens == counts.argmax()].unique().tolist() == [1]
    U = token_utilization(ranks, fit, top_k=2)
    assert (U[tokens == counts.argmax()] > U[tokens == counts.argmin()].max()).all()


def test_significance_sums_to_one_and_frequent_tokens_outrank_rare_ones():
    tokens = _zipf_tokens()
    T = tokens.numel()
    frequent = tokens < 5  # the five most frequent token ids
    rare = tokens >= 150
    index = torch.full((T, 2), 3)
    index[:, 1] = 2  # every token also goes to expert 2 or 3 ...
    index[frequent, 0] = 0  # ... and expert 0 serves only the most frequent tokens
    index[rare, 0] = 1  # expert 1 only rare ones
    index[~frequent & ~rare, 1] = 3
    S = expert_significance(tokens, index, num_experts=4)
    assert S.sum().item() == pytest.approx(1.0)
    assert S[0] > S[1]
    # by hand: S_e = sum of U^-alpha over e's slots / sum over all slots
    fit, ranks = fit_long_tail(tokens)
    R = token_utilization(ranks, fit, 2) ** -ALPHA
    assert S[0].item() == pytest.approx((R[frequent].sum() / (2 * R.sum())).item())


def _brute_force_jenks(x):
    s = np.sort(x)
    best = min(range(1, len(s)), key=lambda k: ((s[:k] - s[:k].mean()) ** 2).sum() + ((s[k:] - s[k:].mean()) ** 2).sum())
    return s[best - 1]


@pytest.mark.parametrize("seed", range(5))
def test_jenks_is_exact(seed):
    x = np.random.default_rng(seed).gamma(2.0, size=17)
    threshold, high = jenks_two_classes(x)
    assert threshold == _brute_force_jenks(x)
    assert (high == (x > threshold)).all() and high.any() and not high.all()


def test_jenks_separates_two_clusters():
    x = np.array([0.1, 0.11, 0.3, 0.09, 0.31, 0.12, 0.29])
    _, high = jenks_two_classes(x)
    assert high.tolist() == [False, False, True, False, True, False, True]
    assert list(itertools.compress(range(7), high)) == [2, 4, 6]
