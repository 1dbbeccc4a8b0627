"""Expert usage (QuantMoE-Bench 3.3): the share of a layer's routed token slots each expert receives."""

from __future__ import annotations

import torch


def expert_usage(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E]`` shares of the ``T * k`` routed slots; they sum to 1."""
    counts = torch.bincount(top_k_index.flatten(), minlength=num_experts).double()
    return counts / counts.sum().clamp(min=1)
