"""`paretoq info`: what a model is made of, and what a budget means for it."""

from __future__ import annotations

from dataclasses import dataclass, field

from paretoq.models.loading import LoadedModel

MIN_BITS, MAX_BITS = 2, 8


@dataclass(frozen=True)
class BudgetMeaning:
    """What an average-bits budget leaves for each part of the model (all components searched)."""

    budget: float
    searched_params: int
    code_bytes: int  # packed integer codes only; scales and zeros come on top
    bf16_bytes: int
    rest_bits_if_experts_at_min: float | None  # None for a dense model
    expert_bits_if_rest_at_max: float | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ModelInfo:
    name_or_path: str
    model_type: str
    num_layers: int
    num_moe_layers: int
    num_experts: int
    top_k: int | None
    params_by_kind: dict[str, int]
    count_by_kind: dict[str, int]
    total_params: int  # every parameter of the model, embeddings and norms included
    components: list
    budget: BudgetMeaning
    outer: list = field(default_factory=list)  # the token embedding and output head (llama.cpp plans only)

    @property
    def component_params(self) -> int:
        return sum(self.params_by_kind.values())

    @property
    def expert_share(self) -> float:
        """Share of the component parameters that sit in routed experts."""
        return self.params_by_kind["expert"] / max(1, self.component_params)

    def to_dict(self) -> dict:
        return {
            "name_or_path": self.name_or_path,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_moe_layers": self.num_moe_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "params_by_kind": self.params_by_kind,
            "count_by_kind": self.count_by_kind,
            "component_params": self.component_params,
            "total_params": self.total_params,
            "expert_share": self.expert_share,
            "budget": self.budget.to_dict(),
            "components": [c.to_dict() for c in self.components],
            "outer_components": [c.to_dict() for c in self.outer],
        }


def budget_meaning(params_by_kind: dict[str, int], budget: float) -> BudgetMeaning:
    total = sum(params_by_kind.values())
    experts = params_by_kind.get("expert", 0)
    rest = total - experts
    return BudgetMeaning(
        budget=budget,
        searched_params=total,
        code_bytes=int(total * budget / 8),
        bf16_bytes=2 * total,
        rest_bits_if_experts_at_min=(budget * total - MIN_BITS * experts) / rest if experts and rest else None,
        expert_bits_if_rest_at_max=(budget * total - MAX_BITS * rest) / experts if experts else None,
    )


def model_info(loaded: LoadedModel, budget: float = 3.0) -> ModelInfo:
    adapter = loaded.adapter
    counts = {"attn": 0, "dense": 0, "shared": 0, "expert": 0}
    for c in adapter.components:
        counts[c.kind] = counts.get(c.kind, 0) + 1
    params = adapter.params_by_kind()
    return ModelInfo(
        name_or_path=loaded.name_or_path,
        model_type=loaded.model.config.model_type,
        num_layers=adapter.num_layers,
        num_moe_layers=len(adapter.moe_blocks),
        num_experts=adapter.num_experts,
        top_k=adapter.top_k,
        params_by_kind=params,
        count_by_kind=counts,
        total_params=sum(p.numel() for p in loaded.model.parameters()),
        components=list(adapter.components),
        budget=budget_meaning(params, budget),
        outer=list(adapter.outer),
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _bits_note(bits: float | None) -> str:
    if bits is None:
        return ""
    if bits > MAX_BITS:
        return f"{bits:.2f} bits (above {MAX_BITS}: everything else fits at {MAX_BITS})"
    if bits < MIN_BITS:
        return f"{bits:.2f} bits (below {MIN_BITS}: not reachable)"
    return f"{bits:.2f} bits"


def format_info(info: ModelInfo) -> str:
    total = info.component_params
    lines = [
        f"model         {info.name_or_path}",
        f"architecture  {info.model_type}: {info.num_layers} layers, {info.num_moe_layers} MoE layers, "
        + (f"{info.num_experts} routed experts, top-{info.top_k}" if info.num_experts else "dense (no experts)"),
        f"parameters    {info.total_params:,} in all, {total:,} in components "
        f"(embeddings, norms, routers and lm_head stay in full precision)",
        "",
        f"{'kind':8s} {'components':>10s} {'parameters':>14s} {'share':>7s}",
    ]
    for kind in ("attn", "dense", "shared", "expert"):
        n = info.params_by_kind.get(kind, 0)
        lines.append(f"{kind:8s} {info.count_by_kind.get(kind, 0):10d} {n:14,d} {n / max(1, total):7.1%}")
    lines.append(f"routed experts hold {info.expert_share:.1%} of the component parameters")
    b = info.budget
    lines += [
        "",
        f"--budget {b.budget:g}: {b.budget:g} bits per weight on average over {b.searched_params:,} parameters "
        f"= {_mb(b.code_bytes)} of codes (+ scales and zeros), {16 / b.budget:.1f}x smaller than bf16 "
        f"({_mb(b.bf16_bytes)})",
    ]
    if b.rest_bits_if_experts_at_min is not None:
        lines.append(f"  routed experts at {MIN_BITS} bits: the rest may average {_bits_note(b.rest_bits_if_experts_at_min)}")
        lines.append(f"  the rest at {MAX_BITS} bits: routed experts must average {_bits_note(b.expert_bits_if_rest_at_max)}")
    return "\n".join(lines)
