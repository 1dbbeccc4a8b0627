"""llama.cpp: a ``--tensor-type-file`` for ``llama-quantize`` with GGUF tensor names.

``llama-quantize`` (``tools/quantize/quantize.cpp``) reads ``pattern=type`` tokens separated by
whitespace, with no comment syntax (a ``#`` line aborts), lowercases each pattern and applies it
with ``std::regex_search``, so patterns are unanchored unless they say so; builds differ on whether
the first or the last matching pattern wins. Every line here is anchored and names one tensor, so
no tensor matches two lines. Types are ggml type names (``q4_k``), not ftypes (``Q4_K_M``).

GGUF names come from the converter's tensor map (``gguf-py/gguf/tensor_mapping.py``): routed
experts are one 3-D tensor per layer and projection (``blk.N.ffn_down_exps.weight``), hence one
width per layer x projection; DeepSeek's ``kv_b_proj`` becomes ``attn_kv_b``, or ``attn_k_b`` and
``attn_v_b`` in newer converters, and all of them take its width.
"""

from __future__ import annotations

import re

from paretoq.errors import ParetoqError
from paretoq.export.common import Context, Export
from paretoq.models import Component
from paretoq.quant.settings import GGML_TYPES

FILE = "tensor-types.txt"
# model_type -> GGUF architecture (convert_hf_to_gguf.py's model classes).
GGUF_ARCH = {"mixtral": "llama", "llama": "llama", "mistral": "llama", "qwen2_moe": "qwen2moe",
             "qwen3_moe": "qwen3moe", "deepseek_v3": "deepseek2", "olmoe": "olmoe", "gpt_oss": "gpt-oss",
             "qwen2": "qwen2", "qwen3": "qwen3"}
ATTN = {"q_proj": ("attn_q",), "k_proj": ("attn_k",), "v_proj": ("attn_v",), "o_proj": ("attn_output",),
        "q_a_proj": ("attn_q_a",), "q_b_proj": ("attn_q_b",), "kv_a_proj_with_mqa": ("attn_kv_a_mqa",),
        "kv_b_proj": ("attn_kv_b", "attn_k_b", "attn_v_b")}
FFN = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
SUFFIX = {"dense": "", "shared": "_shexp", "expert": "_exps"}
OUTER = {"embed": "token_embd", "head": "output"}  # a tied model's head is token_embd itself
# Router tensors; llama-quantize never quantizes them and no line here may match them.
ROUTERS = ("ffn_gate_inp", "ffn_gate_inp_shexp", "exp_probs_b")
# The same width -> type map the search measures with (--target llamacpp, quant method "ggml").
DEFAULT_TYPES = {**GGML_TYPES, "fp": "f16"}
# ftype for the tensors no line names (token_embd and output when the plan leaves them out): the mixture of
# the width nearest the plan's size.
BASE_FTYPE = {2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0"}
# ggml's type names (ggml.h ggml_type) that llama-quantize accepts in a tensor-type file.
GGML_TYPE_NAMES = ("f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
              "iq2_xxs", "iq2_xs", "iq3_xxs", "iq1_s", "iq4_nl", "iq3_s", "iq2_s", "iq4_xs", "iq1_m", "tq1_0",
              "tq2_0", "mxfp4")


def gguf_names(c: Component) -> tuple[str, ...]:
    """GGUF tensor names (without ``.weight``) holding component ``c``."""
    if c.kind in OUTER:
        return (OUTER[c.kind],)
    if c.kind == "attn" and c.proj in ATTN:
        return tuple(f"blk.{c.layer}.{n}" for n in ATTN[c.proj])
    if c.kind in SUFFIX and c.proj in FFN:
        return (f"blk.{c.layer}.{FFN[c.proj]}{SUFFIX[c.kind]}",)
    raise ParetoqError(f"no GGUF tensor name is known for {c.key}; export to another format, or leave it out of the plan")


def parse_types(spec: str | None) -> dict:
    """``--ggml-types 2=iq2_xs,3=q3_k,fp=bf16`` over the defaults."""
    types = dict(DEFAULT_TYPES)
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        width, _, name = item.partition("=")
        key = width.strip() if width.strip() == "fp" else int(width) if width.strip().isdigit() else None
        name = name.strip().lower()
        if key not in types or name not in GGML_TYPE_NAMES:
            raise ParetoqError(f"--ggml-types entry {item!r} is not WIDTH=TYPE with WIDTH in "
                               f"{', '.join(map(str, types))} and TYPE a ggml type ({', '.join(GGML_TYPE_NAMES)}); "
                               "e.g. --ggml-types 2=iq2_xs,8=q8_0")
        types[key] = name
    return types


def lines(ctx: Context) -> list[str]:
    types = ctx.options.get("ggml_types") or DEFAULT_TYPES
    out = {}
    # The token embedding and output head get a line only when the plan names them; else llama-quantize
    # gives them the base mixture's types.
    for c in [*ctx.adapter.components, *(c for c in ctx.adapter.outer if c.key in ctx.plan.bits)]:
        b = ctx.plan.bits.get(c.key)
        pattern = _pattern(gguf_names(c))
        # Components sharing a tensor (all experts' gate of a layer) give one line; the plan is checked servable.
        out[pattern] = f"{pattern}={types['fp' if b is None else b]}"
    return list(out.values())


def _pattern(names: tuple[str, ...]) -> str:
    if not names[0].startswith("blk."):  # token_embd, output
        return rf"^{re.escape(names[0])}\.weight$"
    layer, _, _ = names[0].partition(".")[2].partition(".")
    tails = [n.split(".", 2)[2] for n in names]
    tail = re.escape(tails[0]) if len(tails) == 1 else f"(?:{'|'.join(map(re.escape, tails))})"
    return rf"^blk\.{layer}\.{tail}\.weight$"


def base_width(ctx: Context) -> int:
    """The width whose llama.cpp mixture sets the tensors no line names (token_embd, output): the choice
    nearest the plan's average width (ties to the wider), so they get the types llama.cpp itself gives
    them at about the plan's size. Not the plan's most common width: a plan at 4 bits on average that
    keeps most expert weights at 3 would leave the token embedding at q3_k; and not the widest at or
    below the average, which is always just under a budget (a plan of 2.99 bits would get Q2_K's
    q2_k embedding: on the demo that more than doubled the KL of the budget-3 GGUF)."""
    avg = ctx.plan.avg_bits(ctx.adapter)  # a ggml plan's in its types' real bits: compare those
    price = ctx.plan.quant.budget_bits
    return min(BASE_FTYPE, key=lambda b: (abs(price(b) - avg), -b))


def write(ctx: Context) -> Export:
    notes = []
    arch = GGUF_ARCH.get(ctx.model_type)
    if arch is None:
        notes.append(f"llama.cpp's converter has no known architecture for {ctx.model_type}; check the GGUF names")
    if ctx.model_type == "deepseek_v3" and getattr(ctx.adapter.model.config, "scoring_func", None) is None:
        # transformers routes DeepSeek-V3 with sigmoid scores whatever the config says; the converter writes
        # llama.cpp's gating function only from this key, and without it llama.cpp routes with softmax.
        notes.append("config.json has no \"scoring_func\": llama.cpp's converter then writes no gating function "
                     "and llama.cpp routes this model with softmax where transformers uses sigmoid (another model: "
                     "on paretoq's demo it moved perplexity by 2-4%); add \"scoring_func\": \"sigmoid\" to "
                     "config.json before converting")
    if ctx.model_type == "qwen3_moe" and any(c.kind == "dense" for c in ctx.adapter.components):
        notes.append("GGUF qwen3moe has no dense FFN tensors: a Qwen3-MoE with mlp_only_layers does not convert")
    types = ctx.options.get("ggml_types") or DEFAULT_TYPES
    imatrix = ctx.options.get("imatrix")
    if ctx.plan.quant.method == "ggml":
        if any(types[b] != DEFAULT_TYPES[b] for b in set(ctx.plan.bits.values())):
            raise ParetoqError("the plan was measured with ggml's q2_k..q8_0 (quant method 'ggml'); --ggml-types "
                               "would export other types than were measured: drop it, or search with them")
        if not imatrix:
            notes.append("the plan was measured with paretoq's importance matrix: write it with `paretoq imatrix` "
                         "(the search's --calib, --calib-tokens, --eval-tokens, --seq-len, --seed) and pass --imatrix, "
                         "so that llama-quantize makes the tensors that were measured")
    if any(t.startswith("iq") for t in types.values()) and not imatrix:
        notes.append("i-quants (iq*) need an importance matrix: write one with `paretoq imatrix` and pass "
                     "--imatrix FILE to the export")
    notes.append("K-quants need rows a multiple of 256 wide; llama-quantize stores other rows as its fallback types "
                 "(q2_k and q3_k as q4_0, q4_k as q5_0, q5_k as q5_1, q6_k as q8_0; f16 where 32 does not divide them)"
                 + (", which the search priced and measured" if ctx.plan.quant.method == "ggml" else ""))
    base = BASE_FTYPE[base_width(ctx)]
    command = (f"python convert_hf_to_gguf.py {ctx.model_path} --outtype bf16 --outfile {{out}}/model-bf16.gguf\n"
               f"llama-quantize {f'--imatrix {{out}}/{imatrix} ' if imatrix else ''}--tensor-type-file {{out}}/{FILE} "
               f"{{out}}/model-bf16.gguf {{out}}/model-paretoq.gguf {base}")
    return Export({FILE: "\n".join(lines(ctx)) + "\n"}, command, tuple(notes))
