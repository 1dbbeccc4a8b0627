import torch

from conftest import tiny_model
from paretoq.models import get_adapter
from paretoq.probes.outlier import outlier_score, outlier_scores, outlier_scores_batched


def test_planted_outlier_column():
    m, n = 16, 8
    W = torch.full((m, n), 0.5)
    W[3, 5] = -10.0  # one outlier in input column 5
    expected = 10.0 / (((m - 1) * 0.5 + 10.0) / m)  # max |W[:,5]| / mean |W[:,5]|
    assert abs(outlier_score(W) - expected) < 1e-12
    assert outlier_score(torch.ones(m, n)) == 1.0  # flat columns: ratio 1


def test_columns_are_input_channels_and_zero_columns_score_zero():
    W = torch.zeros(4, 3)  # [out=4, in=3]
    W[:, 0] = torch.tensor([1.0, 1.0, 1.0, 5.0])  # input column 0: max 5, mean 2 -> 2.5; columns 1, 2 all zero
    assert outlier_score(W) == 2.5
    # transposed, each column is a row of W: (1,0,0) or (5,0,0): max / mean = 3
    assert outlier_score(W.T) == 3.0


def test_batched_equals_looped_and_adapter_scores_follow_the_formula():
    W = torch.randn(5, 12, 7)
    torch.testing.assert_close(outlier_scores_batched(W), torch.tensor([outlier_score(w) for w in W], dtype=torch.float64))
    adapter = get_adapter(tiny_model("qwen2_moe"))
    scores = outlier_scores(adapter)
    assert set(scores) == {c.key for c in adapter.components}
    for c in adapter.components:
        A = adapter.weight(c).abs().double()
        assert abs(scores[c.key] - (A.max(0).values / A.mean(0)).max().item()) < 1e-9
