"""Plans: component key -> bits, the quantizer settings, and the budget arithmetic.

A plan file holding only ``format`` and ``bits`` is valid; everything else has defaults.
Components missing from ``bits`` stay in full precision; a key the model lacks is an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from paretoq.cache import atomic_write_text
from paretoq.errors import ParetoqError
from paretoq.models import Adapter, Component
from paretoq.quant.pack import packed_words
from paretoq.quant.quantizer import BITS, QuantSettings, group_columns, GRIDS

PLAN_FORMAT = "paretoq.plan/1"
# Scales and zero points are stored as fp16 each: 32 bits per row and group.
GRID_BITS_PER_GROUP = 32


@dataclass
class Plan:
    bits: dict[str, int]
    quant: QuantSettings = field(default_factory=QuantSettings)
    model: dict = field(default_factory=dict)
    budget: float | None = None
    metrics: dict = field(default_factory=dict)

    # -- arithmetic (needs the model's shapes) ------------------------------------------------
    def components(self, adapter: Adapter) -> list[Component]:
        self.validate(adapter)
        return [adapter.component(k) for k in self.bits]

    def avg_bits(self, adapter: Adapter) -> float:
        """Average bits per weight over the plan's components, weighted by parameter count."""
        comps = self.components(adapter)
        total = sum(c.params for c in comps)
        return sum(c.params * self.bits[c.key] for c in comps) / total if total else 0.0

    def size_bytes(self, adapter: Adapter) -> int:
        """Bytes of the packed codes, scales and zeros of the plan's components (as checkpoints store them)."""
        return sum(component_bytes(c, self.bits[c.key], self.quant.group_size) for c in self.components(adapter))

    def effective_bits(self, adapter: Adapter) -> float:
        """Average bits per weight including scales and zeros."""
        total = sum(c.params for c in self.components(adapter))
        return 8 * self.size_bytes(adapter) / total if total else 0.0

    # -- validation and files -----------------------------------------------------------------
    def validate(self, adapter: Adapter) -> None:
        unknown = [k for k in self.bits if not adapter.has(k)]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise ParetoqError(
                f"the plan names {unknown[0]!r}{more}, which the model does not have; "
                f"list the model's keys with `paretoq info --components`"
            )
        for key in self.bits:
            n = adapter.component(key).shape[1]
            if self.quant.group_size != -1 and self.quant.group_size < n and n % self.quant.group_size:
                raise ParetoqError(
                    f"group_size {self.quant.group_size} does not divide the input dimension {n} of {key!r}; "
                    f"use a group size that divides it, or -1 (per channel)"
                )

    def to_dict(self, adapter: Adapter | None = None) -> dict:
        d = {"format": PLAN_FORMAT, "bits": dict(self.bits), "quant": self.quant.to_dict(), "model": self.model,
             "budget": self.budget}
        if adapter is not None:
            d.update(avg_bits=self.avg_bits(adapter), effective_bits=self.effective_bits(adapter),
                     size_bytes=self.size_bytes(adapter))
        d["metrics"] = self.metrics
        return d

    def save(self, path: Path, adapter: Adapter | None = None) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(adapter), indent=1) + "\n")

    @classmethod
    def from_dict(cls, d: dict, source: str = "plan") -> Plan:
        if not isinstance(d, dict) or d.get("format") != PLAN_FORMAT:
            found = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ParetoqError(f"{source} has format {found!r}; a plan needs \"format\": \"{PLAN_FORMAT}\"")
        bits = d.get("bits")
        if not isinstance(bits, dict):
            raise ParetoqError(f"{source} has no \"bits\" object; write {{\"bits\": {{\"<component key>\": 4, ...}}}}")
        for key, b in bits.items():
            if isinstance(b, bool) or not isinstance(b, int) or b not in BITS:
                raise ParetoqError(f"{source} gives {key!r} {b!r} bits; each component takes one of {', '.join(map(str, BITS))}")
        q = d.get("quant") or {}
        if q.get("method", "gptq") != "gptq":
            raise ParetoqError(f"{source} asks for quant method {q.get('method')!r}; paretoq quantizes with 'gptq'")
        defaults = QuantSettings()
        quant = QuantSettings(
            group_size=int(q.get("group_size", defaults.group_size)), sym=bool(q.get("sym", defaults.sym)),
            act_order=bool(q.get("act_order", defaults.act_order)), damp=float(q.get("damp", defaults.damp)),
            grid=str(q.get("grid", defaults.grid)),
        )
        if quant.grid not in GRIDS:
            raise ParetoqError(f"{source} has grid {quant.grid!r}; pass one of {', '.join(GRIDS)}")
        if quant.group_size != -1 and quant.group_size <= 0:
            raise ParetoqError(f"{source} has group_size {quant.group_size}; pass a positive group size or -1")
        return cls(bits=dict(bits), quant=quant, model=d.get("model") or {}, budget=d.get("budget"),
                   metrics=d.get("metrics") or {})

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise ParetoqError(f"plan file {str(path)!r} does not exist; pass --plan a plan.json")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ParetoqError(f"{path} is not JSON ({exc}); pass a plan written by paretoq") from None
        return cls.from_dict(d, source=str(path))

    @classmethod
    def uniform(cls, adapter: Adapter, bits: int, kinds: tuple[str, ...] = ("attn", "dense", "shared", "expert"),
                **kwargs) -> Plan:
        return cls(bits={c.key: bits for c in adapter.components if c.kind in kinds}, **kwargs)


def component_bytes(c: Component, bits: int, group_size: int) -> int:
    out, n = c.shape
    groups = n // group_columns(n, group_size)
    return out * packed_words(n, bits) * 4 + out * groups * GRID_BITS_PER_GROUP // 8


def check_budget(budget: float) -> float:
    lo, hi = min(BITS), max(BITS)
    if not (math.isfinite(budget) and lo <= budget <= hi):
        raise ParetoqError(f"budget {budget:g} is outside the bit choices; pass --budget between {lo} and {hi}")
    return budget
