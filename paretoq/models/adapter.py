"""Architecture adapters: list a model's components and read/write each one's 2-D weight.

transformers 5 keeps routed experts as fused 3-D parameters. The Experts module of every MoE
architecture carries ``is_transposed``, ``is_concatenated``, ``has_gate`` and ``has_bias`` (set by
``@use_experts_implementation``), and this module derives each expert's gate/up/down ``[out, in]``
view from those flags alone. Nothing else in paretoq knows the storage layout. What differs per
architecture is only names: where the router and the shared experts live.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from paretoq.errors import ParetoqError
from paretoq.models.component import OUTER_KINDS, Component


@dataclass(frozen=True)
class Architecture:
    """The names that differ between architectures; everything else is found generically."""

    model_type: str
    moe: bool = True
    router: str = "gate"  # attribute of the MoE block that holds the router
    shared: tuple[str, ...] = ()  # attributes of the MoE block that hold shared experts
    attention: str = "self_attn"
    mlp: str = "mlp"


ADAPTERS: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("mixtral"),
        # qwen2_moe's `shared_expert_gate` (Linear(H, 1), a sigmoid gate) is router-like: not a component.
        Architecture("qwen2_moe", shared=("shared_expert",)),
        Architecture("qwen3_moe"),  # `mlp_only_layers` layers hold a dense MLP: found generically
        Architecture("deepseek_v3", shared=("shared_experts",)),
        Architecture("olmoe"),
        Architecture("gpt_oss", router="router"),
        Architecture("llama", moe=False),
        Architecture("mistral", moe=False),
        Architecture("qwen2", moe=False),
        Architecture("qwen3", moe=False),
    )
}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


@dataclass(frozen=True)
class MoEBlock:
    """One sparse MoE block: what capture hooks and probes need to find."""

    layer: int
    path: str  # module path of the block, e.g. "model.layers.3.mlp"
    experts_path: str  # e.g. "model.layers.3.mlp.experts"; expert keys are "{experts_path}.{e}.{proj}"
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    shared: tuple[str, ...]  # module paths of the shared experts


def is_fused_experts(module: nn.Module) -> bool:
    """transformers' `@use_experts_implementation` marks every fused Experts module with these flags."""
    return all(hasattr(module, a) for a in ("is_transposed", "has_gate", "num_experts"))


def expert_views(experts: nn.Module, e: int) -> dict[str, torch.Tensor]:
    """Views ``[out, in]`` of expert ``e``'s projections into the fused tensors (no copies).

    Layouts (E experts, H hidden, I intermediate):
      - ``gate_up_proj [E, 2I, H]``, gate rows first (``is_concatenated``) or interleaved
        gate/up rows (``gate = [0::2]``); ``down_proj [E, H, I]``;
      - ``is_transposed`` (GPT-OSS): ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``;
      - ``has_gate=False``: ``up_proj`` instead of ``gate_up_proj``.
    """
    t = experts.is_transposed
    views: dict[str, torch.Tensor] = {}
    if experts.has_gate:
        W = experts.gate_up_proj[e]
        W = W.T if t else W
        if getattr(experts, "is_concatenated", True):
            views["gate_proj"], views["up_proj"] = W.chunk(2, dim=0)
        else:
            views["gate_proj"], views["up_proj"] = W[0::2], W[1::2]
    else:
        W = experts.up_proj[e]
        views["up_proj"] = W.T if t else W
    D = experts.down_proj[e]
    views["down_proj"] = D.T if t else D
    return views


def expert_bias_views(experts: nn.Module, e: int) -> dict[str, torch.Tensor]:
    """Views ``[out]`` of expert ``e``'s biases (empty when the experts have none)."""
    if not experts.has_bias:
        return {}
    views: dict[str, torch.Tensor] = {}
    if experts.has_gate:
        b = experts.gate_up_proj_bias[e]
        if getattr(experts, "is_concatenated", True):
            views["gate_proj"], views["up_proj"] = b.chunk(2, dim=0)
        else:
            views["gate_proj"], views["up_proj"] = b[0::2], b[1::2]
    else:
        views["up_proj"] = experts.up_proj_bias[e]
    views["down_proj"] = experts.down_proj_bias[e]
    return views


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            return name, module
    raise ParetoqError(f"no decoder layers found in {type(model).__name__}; is this a causal language model?")


def _linears(module: nn.Module, prefix: str) -> Iterator[tuple[str, str, nn.Linear]]:
    """(key, relative name, module) of every nn.Linear under `module`."""
    for rel, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            yield f"{prefix}.{rel}", rel, sub


class Adapter:
    """A model's components and the 2-D views of their weights."""

    def __init__(self, model: nn.Module, arch: Architecture):
        self.model = model
        self.arch = arch
        self.components: list[Component] = []
        # The token embedding (layer -1) and the output head (layer ``num_layers``; none when tied to
        # the embedding): components a plan may name, but not in ``components``, which every stage
        # walking the decoder layers (capture, GPTQ, probes, paretoq's own format) iterates.
        self.outer: list[Component] = []
        self.moe_blocks: list[MoEBlock] = []
        self._weights: dict[str, tuple[nn.Module, str, int | None]] = {}
        self._index: dict[str, Component] = {}
        self.layers_prefix, self.layers = _decoder_layers(model)
        self._discover()
        self._discover_outer()

    # -- discovery --------------------------------------------------------------------------------
    def _add(self, component: Component, owner: nn.Module, proj: str, expert: int | None) -> None:
        if component.key in self._index:
            raise AssertionError(f"duplicate component key {component.key}")
        (self.outer if component.kind in OUTER_KINDS else self.components).append(component)
        self._index[component.key] = component
        self._weights[component.key] = (owner, proj, expert)

    def _discover(self) -> None:
        prefix, layers = self.layers_prefix, self.layers
        top_k_default = getattr(self.model.config, "num_experts_per_tok", None)
        for i, layer in enumerate(layers):
            base = f"{prefix}.{i}"
            attn = getattr(layer, self.arch.attention, None)
            if attn is not None:
                for key, rel, lin in _linears(attn, f"{base}.{self.arch.attention}"):
                    self._add(Component(key, "attn", i, None, rel, tuple(lin.weight.shape)), lin, rel, None)
            mlp = getattr(layer, self.arch.mlp, None)
            if mlp is None:
                continue
            mlp_path = f"{base}.{self.arch.mlp}"
            experts_name = next((n for n, m in mlp.named_children() if is_fused_experts(m)), None)
            if experts_name is None:
                for key, rel, lin in _linears(mlp, mlp_path):
                    self._add(Component(key, "dense", i, None, rel, tuple(lin.weight.shape)), lin, rel, None)
                continue
            experts = getattr(mlp, experts_name)
            for e in range(experts.num_experts):
                for proj, view in expert_views(experts, e).items():
                    key = f"{mlp_path}.{experts_name}.{e}.{proj}"
                    self._add(Component(key, "expert", i, e, proj, tuple(view.shape)), experts, proj, e)
            shared_paths = []
            for name in self.arch.shared:
                module = getattr(mlp, name, None)
                if module is None:
                    continue
                shared_paths.append(f"{mlp_path}.{name}")
                for key, rel, lin in _linears(module, f"{mlp_path}.{name}"):
                    self._add(Component(key, "shared", i, None, rel, tuple(lin.weight.shape)), lin, rel, None)
            router = getattr(mlp, self.arch.router)
            top_k = getattr(router, "top_k", None) or top_k_default
            self.moe_blocks.append(MoEBlock(
                i, mlp_path, f"{mlp_path}.{experts_name}", router, experts, experts.num_experts, int(top_k),
                tuple(shared_paths),
            ))

    def _discover_outer(self) -> None:
        model = self.model
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        if isinstance(embed, nn.Embedding) and id(embed) in names:
            key = names[id(embed)]
            self._add(Component(key, "embed", -1, None, key.rpartition(".")[2], tuple(embed.weight.shape)),
                      embed, "weight", None)
        tied = head is not None and embed is not None and head.weight is embed.weight
        if isinstance(head, nn.Linear) and id(head) in names and not tied:
            key = names[id(head)]
            self._add(Component(key, "head", self.num_layers, None, key.rpartition(".")[2], tuple(head.weight.shape)),
                      head, "weight", None)

    # -- access -----------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self._index

    def component(self, key: str) -> Component:
        try:
            return self._index[key]
        except KeyError:
            raise ParetoqError(
                f"the model has no component {key!r}; run `paretoq info` to list its component keys"
            ) from None

    def weight(self, key: str | Component) -> torch.Tensor:
        """The component's weight as a 2-D ``[out, in]`` view into the model's own tensor."""
        key = key.key if isinstance(key, Component) else key
        self.component(key)
        owner, proj, expert = self._weights[key]
        if expert is None:
            return owner.weight
        return expert_views(owner, expert)[proj]

    def bias(self, key: str | Component) -> torch.Tensor | None:
        key = key.key if isinstance(key, Component) else key
        self.component(key)
        owner, proj, expert = self._weights[key]
        if expert is None:
            return owner.bias
        return expert_bias_views(owner, expert).get(proj)

    @torch.no_grad()
    def set_weight(self, key: str | Component, W: torch.Tensor) -> None:
        """Write ``W [out, in]`` into exactly the component's slice of the model's tensor."""
        view = self.weight(key)
        if tuple(W.shape) != tuple(view.shape):
            raise ValueError(f"weight for {key} has shape {tuple(W.shape)}, expected {tuple(view.shape)}")
        view.copy_(W.to(dtype=view.dtype, device=view.device))

    # -- summaries --------------------------------------------------------------------------------
    def _params_by(self, attr: str, out: dict) -> dict:
        for c in self.components:
            key = getattr(c, attr)
            out[key] = out.get(key, 0) + c.params
        return out

    def params_by_kind(self) -> dict[str, int]:
        return self._params_by("kind", {"attn": 0, "dense": 0, "shared": 0, "expert": 0})

    def params_by_layer(self) -> dict[int, int]:
        """Decoder layer -> parameters of its components (the unit the layer walk holds at once)."""
        return self._params_by("layer", {})

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_experts(self) -> int:
        return max((b.num_experts for b in self.moe_blocks), default=0)

    @property
    def top_k(self) -> int | None:
        return max((b.top_k for b in self.moe_blocks), default=None)


def get_adapter(model: nn.Module) -> Adapter:
    model_type = getattr(model.config, "model_type", None)
    arch = ADAPTERS.get(model_type)
    if arch is None:
        raise ParetoqError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(supported_model_types())}"
        )
    return Adapter(model, arch)
