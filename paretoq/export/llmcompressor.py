"""llm-compressor: a recipe with one ``GPTQModifier`` holding a config group per bit width.

compressed-tensors (``utils/match.py: match_targets``) ranks exact names above ``re:`` regexes and
sorts regexes alphabetically, not by group, so overlapping targets would pick a width by spelling.
Every target here is an anchored regex matching exactly its own modules, so no module matches two
groups. Module names are llm-compressor's linearized experts (``mlp.experts.{e}.gate_proj``), which
are paretoq's keys. Routers, router-like gates, ``lm_head`` and the plan's full-precision
components go in ``ignore``.
"""

from __future__ import annotations

import json

import yaml

from paretoq.export.common import Context, Export, names_by_bits
from paretoq.export.names import ignored_modules
from paretoq.export.patterns import layer_rules

RECIPE = "recipe.yaml"
SCRIPT = "quantize_llmcompressor.py"


def weights_args(bits: int, ctx: Context) -> dict:
    q = ctx.plan.quant
    args = {"num_bits": bits, "type": "int", "symmetric": q.sym}
    if q.group_size == -1:
        args["strategy"] = "channel"
    else:
        args.update(strategy="group", group_size=q.group_size)
    return args


def recipe(ctx: Context) -> dict:
    groups = names_by_bits(ctx, lambda c: [c.key])
    fp = groups.pop(None, [])
    prefix = ctx.adapter.layers_prefix
    config_groups = {
        f"w{b}": {"targets": [f"re:{r}" for r in layer_rules(groups[b], prefix)], "weights": weights_args(b, ctx)}
        for b in sorted(groups)
    }
    ignore = [f"re:{r}" for r in layer_rules(ignored_modules(ctx.adapter) + fp, prefix)]
    modifier = {"ignore": ignore, "dampening_frac": ctx.plan.quant.damp,
                "actorder": "weight" if ctx.plan.quant.act_order else None, "config_groups": config_groups}
    return {"quant_stage": {"quant_modifiers": {"GPTQModifier": modifier}}}


def write(ctx: Context) -> Export:
    text = yaml.safe_dump(recipe(ctx), sort_keys=False, width=1 << 16)
    script = _SCRIPT.format(model=json.dumps(ctx.model_path), recipe=RECIPE)
    return Export({RECIPE: text, SCRIPT: script}, f"python {{out}}/{SCRIPT} CALIBRATION.txt {{out}}/quantized")


_SCRIPT = '''"""Quantize with llm-compressor under a paretoq plan (written by `paretoq export`).

    python quantize_llmcompressor.py CALIBRATION.txt OUT_DIR [MODEL_DIR]

CALIBRATION.txt holds calibration text, one sample per paragraph (blank-line separated).
"""
import sys
from pathlib import Path

from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.utils import load_context
from transformers import AutoModelForCausalLM, AutoTokenizer

MODEL = {model}
calib_file, out = sys.argv[1], sys.argv[2]
model_dir = sys.argv[3] if len(sys.argv) > 3 else MODEL
texts = [p.strip() for p in Path(calib_file).read_text().split("\\n\\n") if p.strip()]
with load_context():  # linearizes fused experts into per-expert Linear modules
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
tokenizer = AutoTokenizer.from_pretrained(model_dir)
oneshot(model=model, tokenizer=tokenizer, dataset=Dataset.from_dict({{"text": texts}}),
        recipe=str(Path(__file__).with_name("{recipe}")), num_calibration_samples=len(texts), max_seq_length=2048)
model.save_pretrained(out, save_compressed=True)
tokenizer.save_pretrained(out)
print(f"wrote {{out}}")
'''
