"""exllamav3: an ``--override`` YAML for ``util/recompile.py``, mixing EXL3 models quantized at each width.

``recompile.py -i BASE -o OUT --override plan.yaml`` reads ``sources: [{id, model_dir}]`` and
``overrides: [{key, source}]``; keys are ``*`` globs fullmatched against tensor names
(``loader/safetensors.py: VariantSafetensorsCollection``), and tensors no glob matches come from
BASE. EXL3 stores a linear layer's tensors under its checkpoint module path (``{path}.trellis``,
``.suh``, ``.svh``), so ``{path}.*`` selects one layer; a layer's routed experts share a width per
projection (exllamav3's expert kernels assert it), so one glob covers them.
"""

from __future__ import annotations

import yaml

from paretoq.export.common import Context, Export, base_bits
from paretoq.export.names import checkpoint_name
from paretoq.models import Component

FILE = "recompile.yaml"
# Architectures exllamav3 1.6.5 implements among paretoq's (exllamav3/architecture/*.py).
EXL3_MODEL_TYPES = {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama", "mistral", "qwen2", "qwen3"}


def tensor_glob(c: Component, model_type: str) -> str:
    name = checkpoint_name(c, model_type)
    if c.kind == "expert":  # experts.{e}.proj -> experts.*.proj: one glob for the layer's projection
        head, _, proj = name.rpartition(".")
        name = f"{head.rpartition('.')[0]}.*.{proj}"
    return f"{name}.*"


def source_dir(bits: int) -> str:
    return f"exl3-{bits}bpw"


def overrides(ctx: Context) -> tuple[int, dict]:
    base = base_bits(ctx.plan, ctx.adapter)
    globs: dict[str, int] = {}
    for c in ctx.adapter.components:
        b = ctx.plan.bits[c.key]  # the target keeps nothing in full precision: checked before
        if b != base:
            globs.setdefault(tensor_glob(c, ctx.model_type), b)
    widths = sorted(set(globs.values()))
    return base, {"sources": [{"id": b, "model_dir": source_dir(b)} for b in widths],
                  "overrides": [{"key": k, "source": b} for k, b in globs.items()]}


def write(ctx: Context) -> Export:
    base, spec = overrides(ctx)
    notes = []
    if ctx.model_type not in EXL3_MODEL_TYPES:
        notes.append(f"exllamav3 1.6.5 has no {ctx.model_type} architecture; a later version may")
    notes.append(f"source model_dir paths are relative to where recompile.py runs; edit {FILE} if yours differ")
    widths = [base] + [s["id"] for s in spec["sources"]]
    convert = "\n".join(f"python convert.py -i {ctx.model_path} -o {source_dir(b)} -w work-{b} -b {b}" for b in widths)
    command = f"{convert}\npython util/recompile.py -i {source_dir(base)} -o exl3-paretoq --override {{out}}/{FILE}"
    return Export({FILE: yaml.safe_dump(spec, sort_keys=False)}, command, tuple(notes))
