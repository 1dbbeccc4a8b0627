import torch

from paretoq.probes.cosine import BlockScorePredictor, block_score, cosine_targets, r_squared, train_predictor


def _synthetic(n=4000, d=32, seed=0):
    """Pairs (x, y) whose cosine is a known function of x: cos = 0.9 tanh(w . x)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, generator=g) / d**0.5
    c = 0.9 * torch.tanh(x @ w)
    u = torch.randn(n, d, generator=g)
    u = u - (u * x).sum(-1, keepdim=True) / (x * x).sum(-1, keepdim=True) * x  # orthogonal to x
    y = c[:, None] * x / x.norm(dim=-1, keepdim=True) + (1 - c**2).sqrt()[:, None] * u / u.norm(dim=-1, keepdim=True)
    return x, y, c


def test_targets_are_the_cosines():
    x, y, c = _synthetic(200)
    torch.testing.assert_close(cosine_targets(x, y), c, rtol=1e-4, atol=1e-5)


def test_predictor_learns_a_known_cos_relationship():
    x, y, c = _synthetic()
    model = train_predictor(x[:3000], c[:3000])
    assert isinstance(model, BlockScorePredictor)
    with torch.no_grad():
        assert r_squared(model(x[3000:]), c[3000:]) > 0.9
    score = block_score(3, x, y)
    assert score.r2 > 0.9 and abs(score.score - score.measured) < 0.02 and score.samples == 4000


def test_unpredictable_targets_fall_back_to_the_mean():
    """Noise the input cannot explain: early stopping keeps the predictor near the mean, R^2 near 0."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2000, 64, generator=g)
    s = 0.9 + 0.02 * torch.randn(2000, generator=g)
    model = train_predictor(x[:1500], s[:1500])
    with torch.no_grad():
        r2 = r_squared(model(x[1500:]), s[1500:])
    assert -0.1 < r2 < 0.1
