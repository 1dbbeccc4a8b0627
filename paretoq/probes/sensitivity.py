"""Measured sensitivity: the KL of each group quantized alone at each width (everything else in
full precision), on a subset of the eval windows. The knapsack baseline and the surrogate stand on it.
"""

from __future__ import annotations

from tqdm import tqdm

from collections.abc import Callable

from paretoq.cache import cache_root, digest, load_entry, read_checked_json, write_checked_json
from paretoq.space import Group


def measure_sensitivity(evaluate_kl: Callable[[dict[str, int]], float], groups: list[Group],
                        cache_key: str | None = None, progress: bool = True) -> dict[str, dict[int, float]]:
    """``{group: {bits: KL}}``, cached on disk under ``cache_key`` (None: not cached).

    ``evaluate_kl(bits)`` measures a plan (component key -> bits, the rest in full precision)."""
    path = cache_root() / "sensitivity" / f"{digest('sensitivity', cache_key, [g.name for g in groups])}.json" \
        if cache_key else None
    raw = load_entry(path, read_checked_json, "sensitivity") if path is not None else None
    if raw is not None:
        return {g: {int(b): v for b, v in d.items()} for g, d in raw.items()}
    out: dict[str, dict[int, float]] = {}
    jobs = [(g, b) for g in groups for b in g.choices]
    for g, b in tqdm(jobs, desc="sensitivity", unit="eval", disable=not progress):
        out.setdefault(g.name, {})[b] = evaluate_kl({k: b for k in g.keys})
    if path is not None:
        write_checked_json(path, out)
    return out
