"""MoQa's expert significance S_E (Zheng et al., Sections 3.1-3.3) and its Jenks two-class split (Eq. 8).

Token utilization (Eq. 1) fits a long-tail law to the calibration tokens' frequency ranks,
``D(rank) = C * rank^-beta``, and scales it by the number of active experts K: ``U = K * D``.
Re-weighting (Eq. 2) gives every token occurrence the weight ``R = W(U) = U^-alpha`` (alpha = 0.3),
and an expert's significance (Eq. 5) is the re-weighted share of the routed token slots it serves,
so S_E sums to 1 over a layer's experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ALPHA = 0.3  # MoQa's re-weighting exponent


@dataclass(frozen=True)
class LongTailFit:
    C: float
    beta: float


def fit_long_tail(token_ids: torch.Tensor) -> tuple[LongTailFit, torch.Tensor]:
    """Least-squares fit of ``log freq = log C - beta log rank`` over the distinct tokens (Eq. 1).

    Returns the fit and each occurrence's rank (1 = the most frequent token; ties share the
    order of the stable sort, so equal counts get consecutive ranks).
    """
    values, inverse, counts = torch.unique(token_ids, return_inverse=True, return_counts=True)
    order = torch.argsort(counts, descending=True, stable=True)
    rank_of_value = torch.empty_like(order)
    rank_of_value[order] = torch.arange(1, len(values) + 1)
    freq = counts[order].double() / counts.sum()
    ranks = torch.arange(1, len(values) + 1, dtype=torch.float64)
    if len(values) > 1:
        slope, intercept = np.polyfit(np.log(ranks.numpy()), np.log(freq.numpy()), 1)
    else:
        slope, intercept = 0.0, 0.0
    return LongTailFit(C=float(np.exp(intercept)), beta=float(-slope)), rank_of_value[inverse]


def token_utilization(ranks: torch.Tensor, fit: LongTailFit, top_k: int) -> torch.Tensor:
    """``U = K * C * rank^-beta`` per occurrence (Eq. 1)."""
    return top_k * fit.C * ranks.double().pow(-fit.beta)


def expert_significance(
    token_ids: torch.Tensor, top_k_index: torch.Tensor, num_experts: int, alpha: float = ALPHA
) -> torch.Tensor:
    """S_E ``[E]`` for one MoE layer (Eq. 5) from the tokens and the experts each was routed to."""
    fit, ranks = fit_long_tail(token_ids)
    R = token_utilization(ranks, fit, top_k_index.shape[1]).pow(-alpha)  # Eq. 2, per occurrence
    slots = R[:, None].expand_as(top_k_index).flatten()
    S = torch.zeros(num_experts, dtype=torch.float64).index_add_(0, top_k_index.flatten(), slots)
    return S / S.sum()


def jenks_two_classes(values: torch.Tensor | np.ndarray) -> tuple[float, np.ndarray]:
    """Exact Jenks natural breaks for two classes: the split of the sorted values that minimises the
    summed squared deviation from each class mean. Returns the break (the largest value of the low
    class) and a boolean mask of the high class, in the input's order."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return float(x.max(initial=0.0)), np.zeros(x.shape, dtype=bool)
    s = np.sort(x)
    n = s.size
    c1, c2 = np.cumsum(s), np.cumsum(s * s)
    k = np.arange(1, n)  # low class = s[:k]
    sse_low = c2[k - 1] - c1[k - 1] ** 2 / k
    sse_high = (c2[-1] - c2[k - 1]) - (c1[-1] - c1[k - 1]) ** 2 / (n - k)
    best = int(np.argmin(sse_low + sse_high)) + 1
    threshold = float(s[best - 1])
    return threshold, x > threshold
