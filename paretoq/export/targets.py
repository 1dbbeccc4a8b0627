"""Export targets: what each engine can load, as data, and the checks and search spaces that follow.

A target names the file format paretoq writes for it and the limits of the engine that loads the
result (read in each engine's own source; the versions are in docs/export.md):

- how routed experts may differ (the granularity): ``component`` — every module apart
  (GPTQModel's ``dynamic`` and compressed-tensors' ``config_groups`` are per module);
  ``layer-projection`` — all experts' gate (or up, or down) of a layer share one width (llama.cpp
  stores them as one 3-D tensor; exllamav3's expert kernels build one ``MultiLinear`` per
  projection and assert a single bitrate); ``layer-experts`` — one width per layer's expert
  block (vLLM's ``FusedMoE`` takes one quantization config per layer);
- which projections it fuses into one module, so they share a width (vLLM's ``qkv_proj``,
  ``gate_up_proj``, DeepSeek's ``fused_qkv_a_proj``);
- which widths each kind may take.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from paretoq.errors import ParetoqError
from paretoq.quant import BITS
from paretoq.quant.settings import GGML_TYPES
from paretoq.space import GRANULARITIES, SearchSpace

if TYPE_CHECKING:  # the CLI imports this module at start-up: no torch, no transformers
    from paretoq.models import Adapter, Component
    from paretoq.plan import Plan

ALL_BITS = {k: BITS for k in ("attn", "dense", "shared", "expert")}
OUTER = ("embed", "head")  # the token embedding and output head (paretoq.models.OUTER_KINDS): llama.cpp's alone
# Coarser granularities tie more: each entry lists the granularities it implies.
IMPLIES = {
    "component": {"component"},
    "expert": {"expert", "component"},
    "layer-projection": {"layer-projection", "component"},
    "layer-experts": set(GRANULARITIES),
}


@dataclass(frozen=True)
class Target:
    name: str
    format: str  # the writer in paretoq.export.FORMATS
    engine: str  # for messages: "llama.cpp", "vLLM", ...
    granularity: str  # how routed experts may differ (see the module docstring)
    bits: dict[str, tuple[int, ...]] = field(default_factory=lambda: dict(ALL_BITS))
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)  # fused module name -> its projections
    sym: bool | None = None  # the engine's kernels need this symmetry (None: either)
    act_order: bool | None = None
    method: str | None = None  # the quantizer the engine applies ("ggml": llama.cpp's own; None: GPTQ)
    fp: bool = True  # the engine can keep a component in full precision
    help: str = ""

    def served(self, kind: str) -> tuple[int, ...]:
        return self.bits.get(kind, ())


# vLLM 0.33 (model_executor/models/*.py): q/k/v load into one qkv_proj, gate/up into gate_up_proj,
# DeepSeek's q_a_proj/kv_a_proj_with_mqa into fused_qkv_a_proj (when q_lora_rank is set), and a
# layer's routed experts into one FusedMoE module. Its GPTQ kernels (auto_gptq.py TYPE_MAP, Marlin
# and MoE WNA16) take only 4 and 8 bits, symmetric, without desc_act.
VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa"),
              "gate_up_proj": ("gate_proj", "up_proj")}

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("gptqmodel", "gptqmodel", "GPTQModel", "component",
           help="GPTQModel QuantizeConfig with per-module `dynamic` rules, and a script that quantizes with it"),
    Target("vllm", "gptqmodel", "vLLM", "layer-experts", bits={k: (4, 8) for k in ALL_BITS}, fused=VLLM_FUSED,
           sym=True, act_order=False,
           help="GPTQModel format within vLLM's limits: 4/8 bits, one width per layer's experts and fused module"),
    Target("llmcompressor", "llmcompressor", "llm-compressor", "component",
           help="llm-compressor recipe: GPTQModifier with one config group per bit width"),
    Target("llamacpp", "llamacpp", "llama.cpp", "layer-projection",
           bits={k: tuple(GGML_TYPES) for k in (*ALL_BITS, *OUTER)},
           method="ggml",
           help="llama-quantize --tensor-type-file with GGUF tensor names; searched with ggml's own quantizers "
                "(q2_k, q3_k, q4_k, q5_k, q6_k, q8_0) at their real sizes"),
    Target("exl3", "exl3", "exllamav3", "layer-projection", fp=False,
           help="exllamav3 util/recompile.py --override YAML mixing EXL3 models of each width"),
    Target("json", "json", "any tool", "component", help="the plan as a flat module -> bits map"),
)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise ParetoqError(f"unknown target {name!r}; use one of {', '.join(TARGETS)}")
    return TARGETS[name]


# -- which components must share a width ---------------------------------------------------------------
def unit_name(c: Component, target: Target) -> str:
    """The module of the target's engine that holds component ``c`` (components that share one share a width)."""
    prefix, _, proj = c.key.rpartition(".")
    if c.kind == "expert":
        experts_path = prefix.rpartition(".")[0]
        if target.granularity == "layer-experts":
            return experts_path
        if target.granularity == "layer-projection":
            return f"{experts_path}.*.{proj}"
        if target.granularity == "expert":
            return prefix
    fused = next((name for name, members in target.fused.items() if proj in members), None)
    return f"{prefix}.{fused}" if fused else c.key


def units(adapter: Adapter, target: Target) -> dict[str, list[Component]]:
    out: dict[str, list[Component]] = defaultdict(list)
    for c in adapter.components:
        out[unit_name(c, target)].append(c)
    return dict(out)


def problems(plan: Plan, adapter: Adapter, target: Target) -> list[str]:
    """Why the target cannot load the plan as it is (empty when it can)."""
    found = []
    for name, comps in units(adapter, target).items():
        widths = {c.key: plan.bits.get(c.key) for c in comps}
        if len(set(widths.values())) > 1:
            (k1, b1), (k2, b2) = _two_different(widths)
            found.append(f"{target.engine} gives {name} one width, but the plan gives "
                         f"{k1} {_w(b1)} and {k2} {_w(b2)}")
    for key, b in plan.bits.items():
        c = adapter.component(key)
        if b not in target.served(c.kind):
            served = "/".join(map(str, target.served(c.kind))) or "no"
            found.append(f"{target.engine} serves {served} bits for {c.kind} components, but the plan gives {key} {b} bits")
    if not target.fp:
        fp = [c.key for c in adapter.components if c.key not in plan.bits]
        if fp:
            found.append(f"{target.engine} quantizes every linear layer, but the plan keeps {fp[0]} in full precision")
    return found


def check_servable(plan: Plan, adapter: Adapter, target: Target) -> None:
    found = problems(plan, adapter, target)
    if found:
        more = f" ({len(found) - 1} more problems like it)" if len(found) > 1 else ""
        raise ParetoqError(f"{found[0]}{more}; pass --collapse max or --collapse weighted to coarsen the plan, "
                           f"or search with --target {target.name}")


def _w(b: int | None) -> str:
    return "full precision" if b is None else f"{b} bits"


def _two_different(widths: dict[str, int | None]) -> tuple[tuple[str, int | None], tuple[str, int | None]]:
    items = list(widths.items())
    first = items[0]
    return first, next(i for i in items if i[1] != first[1])


# -- search spaces that only propose what the target serves ---------------------------------------------
def target_space(space: SearchSpace, target: str | None, budget: float | None = None) -> SearchSpace:
    """``space`` tied and restricted so that every plan it holds is one ``target`` can load."""
    if target is None:
        return space
    t = get_target(target)
    if not t.fp:
        missing = [k for k in ALL_BITS if k not in space.bits]
        if missing:
            raise ParetoqError(f"{t.engine} quantizes every linear layer, but search space {space.name!r} leaves "
                               f"{', '.join(missing)} in full precision; use a space with bits for every kind")
    # Keep the space's granularity when it already ties at least what the target needs.
    granularity = space.granularity if t.granularity in IMPLIES[space.granularity] else t.granularity
    bits = {}
    wanted = dict(space.bits)
    if t.method == "ggml":  # a GGUF stores the token embedding and output head like any matrix: search them too
        lo, hi = min(min(v) for v in space.bits.values()), max(max(v) for v in space.bits.values())
        wanted.update({k: (lo, hi) for k in OUTER if k not in space.bits})
    for kind, choices in wanted.items():
        kept = tuple(b for b in choices if b in t.served(kind))
        if t.method == "ggml":  # llama.cpp's q5_k and q6_k between the space's widths, which GPTQ lacks
            kept = tuple(b for b in t.served(kind) if min(choices) <= b <= max(choices))
        if not kept:
            raise ParetoqError(f"search space {space.name!r} gives {kind} {'/'.join(map(str, choices))} bits, none of "
                               f"which {t.engine} serves ({'/'.join(map(str, t.served(kind)))}); widen the space's bits")
        bits[kind] = kept
    floor = min(min(v) for v in bits.values())
    if budget is not None and budget < floor:
        raise ParetoqError(f"budget {budget:g} is below the {floor} bits that --target {t.name} needs at least; "
                           f"pass --budget {floor} or more")
    tie = tuple(dict.fromkeys(space.tie + tuple(t.fused.values())))
    return SearchSpace(f"{space.name}+{t.name}", granularity, bits, tie)
