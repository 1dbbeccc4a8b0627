"""Outlier-aware linear-layer scorer (QuantMoE-Bench 5.1, Algorithm 1)."""

from __future__ import annotations

import torch

from paretoq.models import Adapter


def outlier_scores_batched(W: torch.Tensor) -> torch.Tensor:
    """``max_j ( max_i |W[i,j]| / mean_i |W[i,j]| )`` for each ``W [..., out, in]``.

    Column j is input channel j (the paper's column of ``W in R^{m x n}``). An all-zero column has
    no outlier: it scores 0 instead of dividing by zero.
    """
    A = W.detach().abs().double()
    col_max, col_mean = A.amax(dim=-2), A.mean(dim=-2)
    ratio = torch.where(col_mean > 0, col_max / col_mean.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    return ratio.amax(dim=-1)


def outlier_score(W: torch.Tensor) -> float:
    return outlier_scores_batched(W).item()


def outlier_scores(adapter: Adapter, layer: int | None = None) -> dict[str, float]:
    """Every component's score (of one decoder layer when ``layer`` is given); a layer's routed
    experts share shapes, so each projection is one batch."""
    scores: dict[str, float] = {}
    for b in adapter.moe_blocks:
        if layer is not None and b.layer != layer:
            continue
        for proj in ("gate_proj", "up_proj", "down_proj"):
            keys = [f"{b.experts_path}.{e}.{proj}" for e in range(b.num_experts)]
            keys = [k for k in keys if adapter.has(k)]
            if keys:
                batch = outlier_scores_batched(torch.stack([adapter.weight(k) for k in keys]))
                scores.update(zip(keys, batch.tolist()))
    for c in adapter.components:
        if c.key not in scores and (layer is None or c.layer == layer):
            scores[c.key] = outlier_score(adapter.weight(c))
    return scores
