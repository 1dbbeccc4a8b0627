"""Search spaces: which kinds are searched with which bit choices, and how components tie into groups.

A space is a YAML file (bundled ones by name from ``search_spaces/``, or a path)::

    name: default
    granularity: expert        # component | expert | layer-experts | layer-projection
    bits: {attn: [2, 3, 4, 8], dense: [2, 3, 4, 8], shared: [2, 3, 4, 8], expert: [2, 3, 4, 8]}

A kind left out of ``bits`` is not searched (it stays in full precision). ``embed`` and ``head``
(the token embedding and the output head) are llama.cpp's alone: a ``--target llamacpp`` search
gives them the space's range of widths unless the space names them itself. Granularity ties routed
experts: ``component`` leaves every component alone, ``expert`` ties an expert's gate/up/down (and
a shared expert's), ``layer-experts`` all routed experts of a layer, ``layer-projection`` each
projection across a layer's routed experts. Attention and dense projections are alone unless the
space ties them: ``tie`` lists projections that share one width within one module, as engines that
fuse them need (vLLM's ``qkv_proj`` and ``gate_up_proj``; see ``paretoq.export.targets``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from typing import TYPE_CHECKING

from paretoq.errors import ParetoqError
from paretoq.quant import BITS
from paretoq.quant.ggml import gguf_rows

if TYPE_CHECKING:
    from paretoq.models import Adapter

GRANULARITIES = ("component", "expert", "layer-experts", "layer-projection")
SEARCHED_KINDS = ("attn", "dense", "shared", "expert", "embed", "head")
# The token embedding and output head (`paretoq.models.OUTER_KINDS`): llama.cpp's types only. A
# llama.cpp search adds them when its space does not name them (`paretoq.export.targets.target_space`).


@dataclass(frozen=True)
class SearchSpace:
    name: str
    granularity: str
    bits: dict[str, tuple[int, ...]]  # kind -> sorted bit choices
    tie: tuple[tuple[str, ...], ...] = ()  # projections of one module that share a width, e.g. ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Group:
    """The unit the search gives one bit width."""

    name: str  # also the Optuna parameter name
    kind: str
    layer: int
    keys: tuple[str, ...]
    params: int
    choices: tuple[int, ...]
    # Bits per weight each choice costs in the budget (``QuantSettings.budget_bits``); empty: the
    # widths themselves (GPTQ). llama.cpp's types cost their real size: width 4 = q4_k = 4.5.
    costs: tuple[float, ...] = ()

    def cost(self, bits: int) -> float:
        return self.costs[self.choices.index(bits)] if self.costs else float(bits)


def bundled_spaces() -> dict[str, Path]:
    from paretoq.search_spaces import path

    return {p.stem: p for p in sorted(path().glob("*.yaml"))}


def load_space(name_or_path: str = "default") -> SearchSpace:
    spaces = bundled_spaces()
    path = spaces.get(name_or_path) or Path(name_or_path)
    if not path.is_file():
        raise ParetoqError(
            f"unknown search space {name_or_path!r}; pass one of {', '.join(spaces)} or a YAML file path"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParetoqError(f"search space {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ParetoqError(f"search space {path} must be a mapping with 'granularity' and 'bits'")
    granularity = raw.get("granularity", "expert")
    if granularity not in GRANULARITIES:
        raise ParetoqError(f"search space {path} has granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}")
    bits = raw.get("bits")
    if not isinstance(bits, dict) or not bits:
        raise ParetoqError(f"search space {path} needs 'bits': a mapping of kind to bit choices, e.g. expert: [2, 3, 4]")
    clean = {}
    for kind, choices in bits.items():
        if kind not in SEARCHED_KINDS:
            raise ParetoqError(f"search space {path} names kind {kind!r}; kinds are {', '.join(SEARCHED_KINDS)}")
        if (not isinstance(choices, list) or not choices
                or any(isinstance(b, bool) or b not in BITS for b in choices)):
            raise ParetoqError(f"search space {path}: bits for {kind} must be a non-empty list from {list(BITS)}")
        clean[kind] = tuple(sorted(set(choices)))
    tie = raw.get("tie", [])
    if (not isinstance(tie, list) or any(not isinstance(t, list) or len(t) < 2 or not all(isinstance(p, str) for p in t)
                                         for t in tie)):
        raise ParetoqError(f"search space {path}: 'tie' must be a list of lists of projection names, "
                           "e.g. [[q_proj, k_proj, v_proj], [gate_proj, up_proj]]")
    projs = [p for t in tie for p in t]
    if len(projs) != len(set(projs)):
        raise ParetoqError(f"search space {path}: a projection appears in two 'tie' lists; list each once")
    return SearchSpace(str(raw.get("name", path.stem)), granularity, clean, tuple(tuple(t) for t in tie))


def restrict_bits(space: SearchSpace, bits: tuple[int, ...] | None) -> SearchSpace:
    """The space with every kind's choices intersected with ``bits`` (the CLI's ``--bits``)."""
    if not bits:
        return space
    new = {k: tuple(b for b in v if b in bits) for k, v in space.bits.items()}
    empty = [k for k, v in new.items() if not v]
    if empty:
        raise ParetoqError(f"--bits {','.join(map(str, bits))} leaves no choice for {', '.join(empty)}; widen --bits")
    return SearchSpace(space.name, space.granularity, new, space.tie)


def make_groups(adapter: Adapter, space: SearchSpace, budget_bits=None) -> list[Group]:
    """The space's groups of ``adapter``'s components; ``budget_bits`` ((width, a component's GGUF rows)
    -> bits per weight it costs, e.g. ``QuantSettings.budget_bits``) prices the choices, by default at
    their widths."""
    tied: dict[str, list] = {}
    for c in [*adapter.components, *adapter.outer]:
        if c.kind not in space.bits:
            continue
        prefix, _, proj = c.key.rpartition(".")
        if c.kind == "expert" and space.granularity != "component":
            experts_path = prefix.rpartition(".")[0]
            name = {"expert": prefix, "layer-experts": experts_path,
                    "layer-projection": f"{experts_path}.*.{proj}"}[space.granularity]
        elif c.kind == "shared" and space.granularity != "component":
            name = prefix  # the shared expert's projections together
        else:
            tie = next((t for t in space.tie if proj in t), None)
            name = f"{prefix}.{'+'.join(tie)}" if tie else c.key
        tied.setdefault(name, []).append(c)
    def costs(comps, choices) -> tuple[float, ...]:  # each choice's bits per weight over the group's parameters
        params = sum(c.params for c in comps)
        config = adapter.model.config
        return tuple(sum(c.params * budget_bits(b, gguf_rows(c, config)) for c in comps) / params for b in choices)

    return [
        Group(name, comps[0].kind, comps[0].layer, tuple(c.key for c in comps), sum(c.params for c in comps),
              space.bits[comps[0].kind], costs(comps, space.bits[comps[0].kind]) if budget_bits else ())
        for name, comps in tied.items()
    ]


def encode_genome(genome) -> str:
    """A plan as the study stores it: one digit per group (its index into the group's bit choices),
    one attribute per trial whatever the number of groups."""
    return (np.asarray(genome, dtype=np.uint8) + 48).tobytes().decode("ascii")


def decode_genome(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii"), dtype=np.uint8).astype(np.int64) - 48


def avg_bits(groups: list[Group], bits: dict[str, int]) -> float:
    """Average bits per weight of a group-level plan, weighted by parameter count."""
    total = sum(g.params for g in groups)
    return sum(g.params * g.cost(bits[g.name]) for g in groups) / total


def component_bits(groups: list[Group], bits: dict[str, int]) -> dict[str, int]:
    """A group-level plan as the component key -> bits map a Plan holds."""
    return {k: bits[g.name] for g in groups for k in g.keys}


def min_max_bits(groups: list[Group]) -> tuple[float, float]:
    lo = avg_bits(groups, {g.name: min(g.choices) for g in groups})
    hi = avg_bits(groups, {g.name: max(g.choices) for g in groups})
    return lo, hi
