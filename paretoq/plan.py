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
from paretoq.models import OUTER_KINDS, Adapter, Component
from paretoq.quant.ggml import gguf_rows
from paretoq.quant.pack import packed_words
from paretoq.quant.quantizer import BITS, QuantSettings, check_group_size, group_columns

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
    # ``over="model"`` (what eval, quantize, export and plan.json report): every component of the
    # model, those the plan leaves out at the model's own width (``fp_bits``), so that a plan
    # missing a component never looks smaller than it is. ``over="plan"``: the plan's components
    # only, which is the budget of a search space that quantizes only some kinds (DESIGN.md).
    def components(self, adapter: Adapter) -> list[Component]:
        self.validate(adapter)
        return [adapter.component(k) for k in self.bits]

    def _price(self, c: Component, adapter: Adapter) -> float:
        """Bits per weight ``c`` costs at its width (ggml: as its GGUF tensors store it)."""
        return self.quant.budget_bits(self.bits[c.key], gguf_rows(c, adapter.model.config))

    def avg_bits(self, adapter: Adapter, over: str = "model") -> float:
        """Average bits per weight, weighted by parameter count (see ``over`` above)."""
        comps = self.components(adapter)
        quantized = sum(c.params * self._price(c, adapter) for c in comps)
        if over == "plan":
            total = sum(c.params for c in comps)
            return quantized / total if total else 0.0
        rest = sum(c.params for c in adapter.components if c.key not in self.bits)
        total = self._model_params(adapter)
        return (quantized + rest * fp_bits(adapter)) / total if total else 0.0

    def _model_params(self, adapter: Adapter) -> int:
        """The weights ``over="model"`` counts: every decoder-layer component, and the token embedding
        and output head when the plan names them (a plan that leaves them out reports as before)."""
        return sum(c.params for c in adapter.components) + sum(c.params for c in adapter.outer if c.key in self.bits)

    def size_bytes(self, adapter: Adapter) -> int:
        """Bytes of the packed codes, scales and zeros of the plan's components (as checkpoints store them)."""
        if self.quant.method == "ggml":  # the GGUF's bytes: whole blocks, scales inside
            return sum(math.ceil(c.params * self._price(c, adapter) / 8) for c in self.components(adapter))
        return sum(component_bytes(c, self.bits[c.key], self.quant.group_size) for c in self.components(adapter))

    def effective_bits(self, adapter: Adapter, over: str = "model") -> float:
        """Average bits per weight including scales and zeros (components left out at ``fp_bits``)."""
        planned = sum(c.params for c in self.components(adapter))
        bits = 8 * self.size_bytes(adapter)
        if over == "plan":
            return bits / planned if planned else 0.0
        total = self._model_params(adapter)
        return (bits + (total - planned) * fp_bits(adapter)) / total if total else 0.0

    # -- validation and files -----------------------------------------------------------------
    def validate(self, adapter: Adapter) -> None:
        declared = self.model.get("model_type") if isinstance(self.model, dict) else None
        actual = getattr(adapter.model.config, "model_type", None)
        if declared and actual and declared != actual:
            raise ParetoqError(
                f"the plan is for a {declared!r} model but the model is {actual!r}; pass the plan's own model "
                f"with --model, or a plan made for this one"
            )
        unknown = [k for k in self.bits if not adapter.has(k)]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise ParetoqError(
                f"the plan names {unknown[0]!r}{more}, which the model does not have; "
                f"list the model's keys with `paretoq info --components`"
            )
        wrong = [k for k, b in self.bits.items() if b not in self.quant.widths]
        if wrong:
            raise ParetoqError(f"the plan gives {wrong[0]!r} {self.bits[wrong[0]]} bits, which quant method "
                               f"{self.quant.method!r} does not offer; use one of {', '.join(map(str, self.quant.widths))}")
        outer = [k for k in self.bits if adapter.component(k).kind in OUTER_KINDS]
        if outer and self.quant.method != "ggml":
            raise ParetoqError(f"the plan quantizes {outer[0]!r}, the token embedding or output head, which only "
                               f"llama.cpp's types (quant method 'ggml', --target llamacpp) quantize; leave it out of "
                               f"the plan or search with --target llamacpp")
        if self.quant.method != "ggml":  # ggml: rows a type cannot tile take llama-quantize's fallback type
            check_group_size(self.quant.group_size, {k: adapter.component(k).shape[1] for k in self.bits})

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
        quant = QuantSettings.from_dict(d.get("quant") or {}, source)
        for key, b in bits.items():
            if isinstance(b, bool) or not isinstance(b, int) or b not in quant.widths:
                raise ParetoqError(f"{source} gives {key!r} {b!r} bits; each component takes one of "
                                   f"{', '.join(map(str, quant.widths))}")
        model = d.get("model") or {}
        if not isinstance(model, dict) or not all(isinstance(model.get(k, ""), str) for k in ("name_or_path", "model_type")):
            raise ParetoqError(f"{source} has a malformed \"model\"; write {{\"name_or_path\": \"...\", "
                               f"\"model_type\": \"...\"}} or leave it out")
        budget = d.get("budget")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))):
            raise ParetoqError(f"{source} has budget {budget!r}; write a number of bits or leave it out")
        metrics = d.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise ParetoqError(f"{source} has \"metrics\" of type {type(metrics).__name__}; write an object or "
                               f"leave it out")
        return cls(bits=dict(bits), quant=quant, model=model, budget=budget, metrics=metrics)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise ParetoqError(f"plan file {str(path)!r} does not exist; pass --plan a plan.json")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # JSONDecodeError is a ValueError
            raise ParetoqError(f"{path} is not JSON ({exc}); pass a plan written by paretoq") from None
        return cls.from_dict(d, source=str(path))

    @classmethod
    def uniform(cls, adapter: Adapter, bits: int, kinds: tuple[str, ...] = ("attn", "dense", "shared", "expert"),
                **kwargs) -> Plan:
        return cls(bits={c.key: bits for c in adapter.components if c.kind in kinds}, **kwargs)


def fp_bits(adapter: Adapter) -> int:
    """The width of the model's own weights as stored (its config's dtype; 16 when it names none)."""
    import torch

    dtype = getattr(adapter.model.config, "dtype", None) or getattr(adapter.model.config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype.itemsize * 8 if isinstance(dtype, torch.dtype) else 16


def component_bytes(c: Component, bits: int, group_size: int) -> int:
    out, n = c.shape
    groups = n // group_columns(n, group_size)
    return out * packed_words(n, bits) * 4 + out * groups * GRID_BITS_PER_GROUP // 8


def check_budget(budget: float) -> float:
    lo, hi = min(BITS), max(BITS)
    if not (math.isfinite(budget) and lo <= budget <= hi):
        raise ParetoqError(f"budget {budget:g} is outside the bit choices; pass --budget between {lo} and {hi}")
    return budget
