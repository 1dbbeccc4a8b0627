"""MoE block importance predictor (QuantMoE-Bench 5.2, Algorithm 2).

Per block, a two-layer FFN with tanh learns to predict ``cos(x_in, x_out)`` from the hidden state
entering the block (the residual stream before and after the MLP sublayer). The block's score is
the mean prediction over tokens the predictor was not trained on: a quarter of the captured
samples is held out for scoring, and the predictor's R^2 there is reported beside the score so a
reader can tell whether the predictor learned anything. A high score means the block changes the
residual stream little: less important, fewer bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN = 32
STEPS = 400
LR = 1e-2
WEIGHT_DECAY = 0.1
HOLDOUT = 0.25
# Fraction of the training samples used to pick the stopping step. On the demo's MoE blocks the
# cosine varies little (std ~0.04) and a 2-layer FFN over 256 inputs overfits within a few hundred
# steps (held-out R^2 fell below -1 without it); stopping at the best validation loss keeps the
# predictor at least as good as predicting the mean.
VALIDATION = 0.2
EVAL_EVERY = 10


class BlockScorePredictor(nn.Module):
    """``tanh`` FFN: ``Linear -> tanh -> Linear`` on standardised inputs, predicting the cosine in
    standardised units. The output layer starts at zero, so training starts from the mean predictor."""

    def __init__(self, dim: int, hidden: int = HIDDEN):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1((x - self.mean) / self.std))).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.standardized(x) * self.target_std + self.target_mean


def cosine_targets(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(inputs.float(), outputs.float(), dim=-1)


def train_predictor(X: torch.Tensor, s: torch.Tensor, seed: int = 0, steps: int = STEPS) -> BlockScorePredictor:
    """Full-batch AdamW on the mean squared error (the sets are a few thousand states), stopped at
    the step with the lowest loss on a validation split of the training samples."""
    torch.manual_seed(seed)
    X, s = X.float(), s.float()
    order = torch.randperm(len(s), generator=torch.Generator().manual_seed(seed + 1))
    n_val = max(1, int(len(s) * VALIDATION)) if len(s) > 4 else 0
    val, fit = order[:n_val], order[n_val:]
    model = BlockScorePredictor(X.shape[1])
    model.mean.copy_(X[fit].mean(0))
    model.std.copy_(X[fit].std(0).nan_to_num(1.0).clamp(min=1e-6))
    model.target_mean.copy_(s[fit].mean())
    model.target_std.copy_(s[fit].std().nan_to_num(1.0).clamp(min=1e-6))
    z = (s - model.target_mean) / model.target_std
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    best, best_state = float("inf"), None
    with torch.enable_grad():
        for step in range(steps + 1):
            if n_val and step % EVAL_EVERY == 0:
                with torch.no_grad():
                    val_loss = F.mse_loss(model.standardized(X[val]), z[val]).item()
                if val_loss < best:
                    best, best_state = val_loss, {k: v.clone() for k, v in model.state_dict().items()}
            if step == steps:
                break
            loss = F.mse_loss(model.standardized(X[fit]), z[fit])
            opt.zero_grad()
            loss.backward()
            opt.step()
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval()


def r_squared(pred: torch.Tensor, target: torch.Tensor) -> float:
    ss_res = ((target - pred) ** 2).sum()
    ss_tot = ((target - target.mean()) ** 2).sum()
    return float(1 - ss_res / ss_tot) if ss_tot > 0 else float("nan")


@dataclass(frozen=True)
class BlockScore:
    layer: int
    score: float  # mean predicted cosine on held-out samples
    measured: float  # mean measured cosine on the same samples
    r2: float  # the predictor's R^2 on them
    samples: int


@torch.no_grad()
def block_score(layer: int, inputs: torch.Tensor, outputs: torch.Tensor, seed: int = 0) -> BlockScore:
    s = cosine_targets(inputs, outputs)
    n = s.numel()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, int(n * HOLDOUT))
    hold, train = order[:n_hold], order[n_hold:]
    predictor = train_predictor(inputs[train], s[train], seed=seed)
    pred = predictor(inputs[hold].float())
    return BlockScore(layer, float(pred.mean()), float(s[hold].mean()), r_squared(pred, s[hold]), n)
