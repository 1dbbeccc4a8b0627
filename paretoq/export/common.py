"""What every writer gets (a checked plan and the model's components) and gives back (files, next step)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from paretoq.errors import ParetoqError
from paretoq.export.targets import Target
from paretoq.models import Adapter
from paretoq.plan import Plan


@dataclass(frozen=True)
class Context:
    plan: Plan  # already servable by the target (collapsed where asked)
    adapter: Adapter
    target: Target
    model_type: str
    model_path: str  # the full-precision model, as the user passes it to the quantizer
    options: dict = field(default_factory=dict)  # writer-specific (llama.cpp: ggml types per width)


@dataclass(frozen=True)
class Export:
    files: dict[str, str]  # file name -> text, written into the output directory
    next: str  # the command(s) the user runs next, with {out} standing for the output directory
    notes: tuple[str, ...] = ()


def base_bits(plan: Plan, adapter: Adapter) -> int:
    """The width holding the most parameters: quantizers' default, so rules are only needed for the rest."""
    if not plan.bits:
        raise ParetoqError("the plan quantizes no component; give some components bits before exporting it")
    params = Counter()
    for key, b in plan.bits.items():
        params[b] += adapter.component(key).params
    return max(params, key=lambda b: (params[b], b))


def names_by_bits(ctx: Context, names) -> dict[int | None, list[str]]:
    """Every component's module names (``names(component)`` gives them), grouped by the plan's width.

    ``None`` collects the components the plan keeps in full precision.
    """
    out: dict[int | None, list[str]] = {}
    for c in ctx.adapter.components:
        out.setdefault(ctx.plan.bits.get(c.key), []).extend(names(c))
    return out
