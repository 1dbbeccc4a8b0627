"""GPTQModel: a ``QuantizeConfig`` with ``dynamic`` per-module rules, and a script that quantizes with it.

GPTQModel (``quantization/config.py: _resolve_dynamic_override``) and vLLM (``gptq_utils.py:
get_dynamic_override``) apply ``dynamic`` alike: keys are regexes tried with ``re.match`` in order,
the first match wins, ``-:`` keeps a module unquantized, ``+:`` overrides the base config. Modules
no rule matches take the base ``bits``: the width that holds the most parameters.

The rules name each module as GPTQModel quantizes it (the defused per-expert path), as the
checkpoint stores it (Mixtral's ``block_sparse_moe.experts.{e}.w1``) and as vLLM loads it (one
``qkv_proj``, ``gate_up_proj`` or layer ``experts`` module) wherever its parts share one width, so
one config serves quantizing, loading with GPTQModel, and serving with vLLM.
"""

from __future__ import annotations

import json

from paretoq.export.common import Context, Export, base_bits, names_by_bits
from paretoq.export.names import checkpoint_name, checkpoint_path, ignored_modules
from paretoq.export.patterns import layer_rules
from paretoq.export.targets import TARGETS, units
from paretoq.models import Component

CONFIG = "quantize_config.json"
SCRIPT = "quantize_gptqmodel.py"


def module_names(c: Component, model_type: str) -> list[str]:
    return list(dict.fromkeys([c.key, checkpoint_name(c, model_type)]))


def dynamic_rules(ctx: Context) -> tuple[int, dict[str, dict]]:
    """(base bits, the ``dynamic`` dict) for the plan."""
    mt = ctx.model_type
    base = base_bits(ctx.plan, ctx.adapter)
    groups = names_by_bits(ctx, lambda c: module_names(c, mt))
    # vLLM's fused modules, wherever the plan gives all their parts one width.
    for name, comps in units(ctx.adapter, TARGETS["vllm"]).items():
        widths = {ctx.plan.bits.get(c.key) for c in comps}
        if name != comps[0].key and len(widths) == 1:
            groups.setdefault(widths.pop(), []).extend(dict.fromkeys([name, checkpoint_path(name, mt)]))
    ignored = [n for m in ignored_modules(ctx.adapter) for n in dict.fromkeys([m, checkpoint_path(m, mt)])]
    prefix = ctx.adapter.layers_prefix
    dynamic: dict[str, dict] = {f"-:{r}": {} for r in layer_rules(ignored + groups.pop(None, []), prefix)}
    for b in sorted(groups):
        if b != base:
            dynamic.update((f"+:{r}", {"bits": b}) for r in layer_rules(groups[b], prefix))
    return base, dynamic


def quantize_config(ctx: Context) -> tuple[dict, list[str]]:
    q, t, notes = ctx.plan.quant, ctx.target, []
    sym = q.sym if t.sym is None else t.sym
    act_order = q.act_order if t.act_order is None else t.act_order
    if (sym, act_order) != (q.sym, q.act_order):
        notes.append(f"{t.engine} needs sym={sym} and desc_act={act_order}; the plan was searched with "
                     f"sym={q.sym}, act_order={q.act_order}, so GPTQModel's quantization will differ slightly")
    base, dynamic = dynamic_rules(ctx)
    cfg = {"bits": base, "group_size": q.group_size, "sym": sym, "desc_act": act_order, "damp_percent": q.damp,
           "dynamic": dynamic}
    if act_order:
        cfg["act_group_aware"] = False  # GPTQModel refuses desc_act together with its default act_group_aware
    return cfg, notes


def write(ctx: Context) -> Export:
    cfg, notes = quantize_config(ctx)
    script = _SCRIPT.format(model=json.dumps(ctx.model_path), config=CONFIG)
    serve = "\nvllm serve {out}/quantized" if ctx.target.name == "vllm" else ""
    return Export({CONFIG: json.dumps(cfg, indent=1) + "\n", SCRIPT: script},
                  f"python {{out}}/{SCRIPT} CALIBRATION.txt {{out}}/quantized{serve}", tuple(notes))


_SCRIPT = '''"""Quantize with GPTQModel under a paretoq plan (written by `paretoq export`).

    python quantize_gptqmodel.py CALIBRATION.txt OUT_DIR [MODEL_DIR]

CALIBRATION.txt holds calibration text, one sample per paragraph (blank-line separated).
"""
import json
import sys
from pathlib import Path

from gptqmodel import GPTQModel, QuantizeConfig

MODEL = {model}
calib_file, out = sys.argv[1], sys.argv[2]
model_dir = sys.argv[3] if len(sys.argv) > 3 else MODEL
config = json.loads(Path(__file__).with_name("{config}").read_text())
calibration = [p.strip() for p in Path(calib_file).read_text().split("\\n\\n") if p.strip()]
model = GPTQModel.load(model_dir, QuantizeConfig(**config))
model.quantize(calibration, batch_size=1)
model.save(out)
print(f"wrote {{out}}; load it with GPTQModel.load({{out!r}})")
'''
