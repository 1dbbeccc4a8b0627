"""Coarsen a plan until a target can load it: one width per engine module, from the widths it serves.

``max`` gives each engine module the largest width of its components (quality first: no component
loses bits); ``weighted`` gives it the served width nearest the parameter-weighted mean of its
components' widths (size first: the average stays close). Full precision counts as 16 bits, and a
module stays in full precision only where that is what the rule picks and the target allows it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from paretoq.errors import ParetoqError
from paretoq.export.targets import Target, units
from paretoq.models import Adapter
from paretoq.plan import Plan

MODES = ("max", "weighted")
FP = 16


@dataclass(frozen=True)
class Collapsed:
    plan: Plan
    avg_bits_before: float
    avg_bits_after: float
    changed: int  # components whose width changed

    def summary(self) -> str:
        return (f"collapsed {self.changed} components: average bits {self.avg_bits_before:.3f} -> "
                f"{self.avg_bits_after:.3f}")


def collapse(plan: Plan, adapter: Adapter, target: Target, mode: str) -> Collapsed:
    if mode not in MODES:
        raise ParetoqError(f"unknown --collapse {mode!r}; use one of {', '.join(MODES)}")
    bits: dict[str, int] = {}
    for comps in units(adapter, target).values():
        widths = [plan.bits.get(c.key, FP) for c in comps]
        options = sorted(set(target.served(comps[0].kind)) | ({FP} if target.fp else set()))
        if not options:
            raise ParetoqError(f"{target.engine} serves no width for {comps[0].kind} components; "
                               f"leave them out of the plan")
        if mode == "max":
            w = next((o for o in options if o >= max(widths)), options[-1])
        else:
            mean = sum(c.params * b for c, b in zip(comps, widths)) / sum(c.params for c in comps)
            w = min(options, key=lambda o: (abs(o - mean), -o))  # ties go to the wider
        if w != FP:
            bits.update((c.key, w) for c in comps)
    new = replace(plan, bits=bits, metrics={})
    changed = sum(plan.bits.get(c.key) != bits.get(c.key) for c in adapter.components)
    return Collapsed(new, plan.avg_bits(adapter), new.avg_bits(adapter), changed)
