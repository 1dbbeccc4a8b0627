"""The quantizer's settings, as plans record them and the CLI takes them (no torch: the CLI checks them at start-up).

One validator (``QuantSettings.from_dict``) serves a plan file's ``quant`` object and the
``--group-size/--sym/--asym/--act-order/--damp/--grid`` flags, so both refuse the same values with
the same words. ``settings_for`` decides what a command measures: the user's flags first, then what
the export target's engine needs, then paretoq's defaults; a flag the target cannot serve is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from paretoq.errors import ParetoqError

GROUP_SIZES = (256, 128, 64, 32)  # the group sizes GPTQ kernels and formats commonly serve, offered on a bad one
METHODS = ("gptq", "ggml")  # paretoq's GPTQ, or llama.cpp's own quantizers (paretoq.quant.ggml)
# method "ggml": the width a plan gives -> the ggml type it is quantized to (llama.cpp's K-quants and
# q8_0); its budget bits are the type's real bits per weight (q4_k: 4.5, scales included).
GGML_TYPES = {2: "q2_k", 3: "q3_k", 4: "q4_k", 5: "q5_k", 6: "q6_k", 8: "q8_0"}
GPTQ_WIDTHS = (2, 3, 4, 8)
GRIDS = ("search", "minmax")  # how GPTQ chooses a group's grid: a shrink search on its loss, or min-max
# Below 1e-4 the damping vanishes in float32 even after GPTQ's retries (x10 each, 6 times).
MIN_DAMP = 1e-4
# The flag that sets each field, for messages.
FLAGS = {"group_size": "--group-size", "sym": "--sym/--asym", "act_order": "--act-order/--no-act-order",
         "damp": "--damp", "grid": "--grid", "method": "--quantizer"}


@dataclass(frozen=True)
class QuantSettings:
    group_size: int = 128  # -1: per channel
    sym: bool = False
    act_order: bool = False
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to the diagonal
    block_size: int = 128  # GPTQ's lazy-update block
    grid: str = "search"  # "search": shrink search on GPTQ's loss (gptq.py); "minmax": the reference's grid
    # "ggml": llama.cpp's quantizers at GGML_TYPES, with the calibration's importance matrix; the
    # GPTQ fields above then do not apply (each ggml type fixes its own blocks and scales)
    method: str = "gptq"

    @property
    def widths(self) -> tuple[int, ...]:
        """The widths a plan under these settings may give a component."""
        return tuple(GGML_TYPES) if self.method == "ggml" else GPTQ_WIDTHS

    def budget_bits(self, bits: int, rows: list[tuple[int, int]] | None = None) -> float:
        """Bits per weight that ``bits`` costs in a budget: the width itself for GPTQ (scales are
        reported apart, as effective bits); for ggml the real bits per weight of the GGUF tensors a
        component is stored as, ``rows`` ((rows, row width) each: `paretoq.quant.ggml.gguf_rows`),
        each as the type llama-quantize stores for rows that wide (its fallback where the type's
        blocks do not tile them); ``None``: the type itself."""
        if self.method != "ggml":
            return float(bits)
        from paretoq.quant.ggml import bits_per_weight, stored_type  # gguf's block sizes: only for ggml plans

        t = GGML_TYPES[bits]
        if rows is None:
            return bits_per_weight(t)
        return sum(n * w * bits_per_weight(stored_type(t, w)) for n, w in rows) / sum(n * w for n, w in rows)

    def to_dict(self) -> dict:
        if self.method == "ggml":
            return {"method": "ggml", "types": {str(b): t for b, t in GGML_TYPES.items()}}
        return {"method": "gptq", "group_size": self.group_size, "sym": self.sym, "act_order": self.act_order,
                "damp": self.damp, "grid": self.grid}

    @classmethod
    def from_dict(cls, q: dict, source: str = "plan") -> QuantSettings:
        """Settings from a plan's ``quant`` object (missing keys take the defaults), each value checked."""
        if not isinstance(q, dict):
            raise ParetoqError(f"{source} has \"quant\" of type {type(q).__name__}; write an object such as "
                               f"{{\"group_size\": 128, \"sym\": false}}")
        method = q.get("method", "gptq")
        if method not in METHODS:
            raise ParetoqError(f"{source} asks for quant method {method!r}; pass one of {', '.join(METHODS)}")
        if method == "ggml":
            types = q.get("types", {str(b): t for b, t in GGML_TYPES.items()})
            if types != {str(b): t for b, t in GGML_TYPES.items()}:
                raise ParetoqError(f"{source} maps widths to ggml types {types!r}; paretoq's ggml method uses "
                                   f"{', '.join(f'{b}={t}' for b, t in GGML_TYPES.items())}")
            return replace(cls(), method="ggml")
        known = {f.name for f in fields(cls)} - {"block_size", "method"}
        return replace(cls(), **{k: check(k, q[k], source) for k in known if k in q})


def check(name: str, value, source: str = "plan"):
    """``value`` for the field ``name``, or a one-line error naming ``source`` and what is accepted."""
    if name == "group_size":
        if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or value > 0):
            raise ParetoqError(f"{source} has group_size {value!r}; pass a positive integer (e.g. 128) or -1 "
                               f"(per channel)")
        return value
    if name == "damp":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (MIN_DAMP <= value <= 1):
            raise ParetoqError(f"{source} has damp {value!r}; pass a number from {MIN_DAMP:g} to 1, e.g. "
                               f"{QuantSettings.damp} (a fraction of the mean Hessian diagonal)")
        return float(value)
    if name in ("sym", "act_order"):
        if not isinstance(value, bool):
            raise ParetoqError(f"{source} has {name} {value!r}; pass true or false")
        return value
    if name == "method":
        if value not in METHODS:
            raise ParetoqError(f"{source} has quantizer {value!r}; pass one of {', '.join(METHODS)}")
        return value
    if name == "grid":
        if value not in GRIDS:
            raise ParetoqError(f"{source} has grid {value!r}; pass one of {', '.join(GRIDS)}")
        return value
    raise KeyError(name)


def settings_for(flags: dict, target=None, base: QuantSettings | None = None) -> QuantSettings:
    """What a command quantizes with: ``flags`` (field -> value, None where not given) over what
    ``target`` (a ``paretoq.export.targets.Target`` or None) needs, over ``base`` (a plan's own
    settings, else the defaults). A flag that contradicts the target, or a plan's recorded setting,
    is refused: the plan was measured with its settings, and the target's engine runs only its own."""
    base = base or QuantSettings()
    given = {k: check(k, v, FLAGS[k]) for k, v in flags.items() if v is not None}
    needed = {k: v for k, v in (("sym", getattr(target, "sym", None)), ("act_order", getattr(target, "act_order", None)),
                                ("method", getattr(target, "method", None)))
              if v is not None}
    for k, v in given.items():
        if k in needed and needed[k] != v:
            raise ParetoqError(f"{flag_args({k: v})[0]}: {target.engine} runs {k}={needed[k]}, not {v}; drop the "
                               f"flag or choose another --target")
    return replace(base, **{**needed, **given})


def flag_args(flags: dict) -> list[str]:
    """The command-line flags that give ``flags`` (QuantSettings field -> value) back, for worker processes."""
    out = []
    for k, v in flags.items():
        if isinstance(v, bool):
            out.append({"sym": "--sym" if v else "--asym"}.get(k, f"--{'' if v else 'no-'}{k.replace('_', '-')}"))
        else:
            out += [FLAGS[k], str(v)]
    return out


def check_group_size(group_size: int, widths: dict[str, int]) -> None:
    """Refuse, before any work, a group size that does not tile the input width of every component.

    ``widths``: component key (or any name) -> input width (``Component.shape[1]``). A group at
    least as wide as a row is one group per row (``group_columns``), so only narrower groups must
    divide. The error names the first widths that fail and the group sizes that tile them all
    (GPT-OSS: 2880 = 64 x 45, so 64 or 32, never 128).
    """
    if group_size == -1:
        return
    if group_size < 1:
        raise ParetoqError(f"group size {group_size} must be positive, or -1 for one group per row (per channel)")
    bad: dict[int, list[str]] = {}
    for name, w in widths.items():
        if group_size < w and w % group_size:
            bad.setdefault(w, []).append(name)
    if not bad:
        return
    fits = [g for g in GROUP_SIZES if all(g >= w or w % g == 0 for w in widths.values())]
    named = "; ".join(f"{w} ({names[0]}{f' and {len(names) - 1} more' if len(names) > 1 else ''})"
                      for w, names in sorted(bad.items()))
    if fits:
        fix = f"pass --group-size {' or '.join(map(str, fits))} (or -1, per channel)"
    else:
        fix = f"no group size in {GROUP_SIZES} divides them all; pass --group-size -1 (per channel)"
    raise ParetoqError(f"group size {group_size} does not divide the input width {named}; {fix}")
