"""Measured sensitivity: each group's KL cost at each width, on the selection windows (never the
held-out ones). The knapsack baseline and the surrogate's prior stand on it.

Methods, from the most to the least exact (the cheapest last):

- ``group``: each group quantized alone at each width (G x widths evaluations): exact per group.
- ``lowest``: each group quantized alone at its lowest width only (G evaluations), its KL at every
  other width that measurement times the ratio of its GPTQ output error there to its error at the
  lowest (``cache.loss``; where GPTQ has no error, a component rounded to nearest for want of
  tokens, 4x less per added bit, the noise power of a uniform grid). What differs between the
  experts of one layer (their routing weights, the tokens they see, where their errors land)
  is measured, and only the shape across widths is borrowed from GPTQ.
- ``unit`` (O(layers x kinds x widths) evaluations, independent of G): each unit (a layer's groups
  of one kind: its attention projections, its shared expert, its routed experts) is quantized
  alone at each width, everything else in full precision, and the unit's measured KL is shared
  among its groups in proportion to their GPTQ output error (a per-token mean, since GPTQ scales
  the Hessian by 1/tokens) times how often the group runs (routing usage; 1 outside routed
  experts). That is, each group's error is mapped to the final KL by one factor per (unit,
  width), fitted on that unit's own measurement, as exllamav2's measurement pass maps layer
  errors. Summed over a unit at one width it gives back the unit's measured KL exactly.
- ``auto`` (the default): ``lowest`` when it costs no more evaluations than the search's verified
  trials, else ``unit``. The demo (64 groups, 100 trials) gets ``lowest``: 64 evaluations where
  ``group`` needs 256 and ``unit`` 56. Over two seeds and budgets 2.5/3/4, the exact knapsack over
  ``lowest`` has 0.93x the held-out KL of the knapsack over ``group`` (geometric mean; 0.59-1.08x),
  over ``unit`` 1.07x (0.91-1.20x), and ``lowest`` ranks a layer's experts nearly as ``group`` does
  (Spearman 0.82-0.83, ``unit`` 0.29-0.40; studies/demo/README.md). Qwen3-30B-A3B (6,336 groups)
  gets ``unit``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tqdm import tqdm

from paretoq.cache import cache_root, digest, load_entry, read_checked_json, write_checked_json
from paretoq.space import Group

METHODS = ("auto", "unit", "lowest", "group")
Measure = Callable[[dict[str, int]], float]  # component key -> bits, the rest in fp  ->  KL


def resolve_method(method: str, groups: list[Group], trials: int) -> str:
    """``auto`` as the method it stands for (module docstring); any other method as it is."""
    if method != "auto":
        return method
    return "lowest" if evaluations(groups, "lowest") <= trials else "unit"


def _cached(path, compute) -> dict[str, dict[int, float]]:
    raw = load_entry(path, read_checked_json, "sensitivity") if path is not None else None
    if raw is not None:
        return {g: {int(b): v for b, v in d.items()} for g, d in raw.items()}
    out = compute()
    if path is not None:
        write_checked_json(path, out)
    return out


def measure_sensitivity(measure: Measure, groups: list[Group], method: str = "unit",
                        loss: dict[tuple[str, int], float] | None = None, usage: dict[str, float] | None = None,
                        cache_key: str | None = None, progress: bool = True) -> dict[str, dict[int, float]]:
    """``{group: {bits: KL}}``, cached on disk under ``cache_key`` (None: not cached)."""
    path = cache_root() / "sensitivity" / f"{digest('sensitivity', method, cache_key, [g.name for g in groups])}.json" \
        if cache_key else None
    if method == "group":
        return _cached(path, lambda: _by_group(measure, groups, progress))
    if method == "unit":
        return _cached(path, lambda: _by_unit(measure, groups, loss or {}, usage or {}, progress))
    if method == "lowest":
        return _cached(path, lambda: _at_lowest(measure, groups, loss or {}, progress))
    raise ValueError(f"unknown sensitivity method {method!r}")


def units(groups: list[Group]) -> dict[tuple[int, str], list[Group]]:
    out: dict[tuple[int, str], list[Group]] = {}
    for g in groups:
        out.setdefault((g.layer, g.kind), []).append(g)
    return out


def evaluations(groups: list[Group], method: str = "unit") -> int:
    """How many plans a method evaluates (for cost accounting)."""
    if method == "group":
        return sum(len(g.choices) for g in groups)
    if method == "lowest":
        return len(groups)
    return sum(len({b for g in gs for b in g.choices}) for gs in units(groups).values())


def _by_group(measure: Measure, groups: list[Group], progress: bool) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    jobs = [(g, b) for g in groups for b in g.choices]
    for g, b in tqdm(jobs, desc="sensitivity", unit="eval", disable=not progress):
        out.setdefault(g.name, {})[b] = measure({k: b for k in g.keys})
    return out


def _error(g: Group, b: int, loss: dict[tuple[str, int], float]) -> float:
    """The group's GPTQ output error at ``b`` (NaN where a component has none: rounded to nearest)."""
    return sum(loss.get((k, b), math.nan) for k in g.keys)


def _at_lowest(measure: Measure, groups: list[Group], loss: dict[tuple[str, int], float],
               progress: bool) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for g in tqdm(groups, desc="sensitivity", unit="eval", disable=not progress):
        lo = min(g.choices)
        kl = measure({k: lo for k in g.keys})
        base = _error(g, lo, loss)
        out[g.name] = {}
        for b in g.choices:
            err = _error(g, b, loss)
            ratio = err / base if math.isfinite(err) and math.isfinite(base) and base > 0 else 4.0 ** (lo - b)
            out[g.name][b] = kl * ratio
    return out


def _by_unit(measure: Measure, groups: list[Group], loss: dict[tuple[str, int], float], usage: dict[str, float],
             progress: bool) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {g.name: {} for g in groups}
    jobs = [(members, b) for members in units(groups).values() for b in sorted({b for g in members for b in g.choices})]
    for members, b in tqdm(jobs, desc="sensitivity", unit="eval", disable=not progress):
        at = [g for g in members if b in g.choices]
        kl = measure({k: b for g in at for k in g.keys})
        share = {}
        for g in at:
            err = sum(v for k in g.keys if math.isfinite(v := loss.get((k, b), math.nan)))
            share[g.name] = max(err, 0.0) * usage.get(g.name, 1.0)
        total = sum(share.values())
        for g in at:
            out[g.name][b] = kl * (share[g.name] / total if total > 0 else 1.0 / len(at))
    return out
