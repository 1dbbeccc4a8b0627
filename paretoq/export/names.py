"""Module names outside paretoq's own keys: checkpoint aliases and the modules no plan quantizes.

paretoq's keys are the defused per-expert module paths that GPTQModel (through Defuser) and
llm-compressor (through its linearized experts) quantize. Checkpoints can differ: Mixtral's are
saved as ``block_sparse_moe.experts.{e}.w1/w2/w3`` (w1 = gate, w3 = up, w2 = down), which is what
vLLM's Mixtral and exllamav3 load, and what GPTQModel's Mixtral definition lists as aliases
(``"mlp|block_sparse_moe"``, ``"gate_proj|w1"``).
"""

from __future__ import annotations

from torch import nn

from paretoq.models import Adapter, Component

# model_type -> (runtime name part, checkpoint name part), for routed experts' module paths.
EXPERT_ALIASES = {
    "mixtral": (("mlp", "block_sparse_moe"), ("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")),
}


def _swap(parts: list[str], pairs) -> list[str]:
    table = dict(pairs)
    return [table.get(p, p) for p in parts]


def checkpoint_name(c: Component, model_type: str) -> str:
    """The module path as the model's checkpoint stores it (what vLLM and exllamav3 read)."""
    if c.kind != "expert" or model_type not in EXPERT_ALIASES:
        return c.key
    return ".".join(_swap(c.key.split("."), EXPERT_ALIASES[model_type]))


def checkpoint_path(path: str, model_type: str) -> str:
    """A module path inside a MoE block (the experts, the router) in checkpoint form."""
    if model_type not in EXPERT_ALIASES:
        return path
    return ".".join(_swap(path.split("."), EXPERT_ALIASES[model_type][:1]))


def ignored_modules(adapter: Adapter) -> list[str]:
    """Modules that stay in full precision whatever the plan: routers, router-like gates, lm_head."""
    keys = {c.key for c in adapter.components}
    routers = [f"{b.path}.{adapter.arch.router}" for b in adapter.moe_blocks]
    linears = [n for n, m in adapter.model.named_modules() if isinstance(m, nn.Linear) and n not in keys]
    return list(dict.fromkeys(routers + linears))
