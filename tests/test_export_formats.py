"""Every exported file, read back with its target's own matching rules, gives every module the plan's width.

Each oracle below restates one tool's semantics, from its source (named in paretoq/export/*.py):
GPTQModel and vLLM try ``dynamic`` keys with ``re.match`` in order and the first wins;
compressed-tensors is run itself; llama.cpp applies ``regex_search`` to lowercased patterns;
exllamav3's recompile fullmatches ``*`` globs, later sources first.
"""

import json
import random
import re
from fnmatch import fnmatchcase

import pytest
import torch
import yaml
from torch import nn

from conftest import DENSE_TYPES, MOE_TYPES, tiny_model
from paretoq.export import exl3, llamacpp, llmcompressor
from paretoq.export.common import Context
from paretoq.export.gptqmodel import quantize_config
from paretoq.export.names import checkpoint_name, checkpoint_path, ignored_modules
from paretoq.export.run import FORMATS
from paretoq.export.targets import TARGETS, problems, units
from paretoq.models import get_adapter
from paretoq.plan import Plan
from paretoq.quant.quantizer import QuantSettings

ARCHS = MOE_TYPES + DENSE_TYPES


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    m = tiny_model(request.param)
    return request.param, m, get_adapter(m)


def servable_plan(adapter, target, seed=0, fp_share=0.15):
    """A random plan the target can load: one width per engine module, some modules in full precision."""
    rng = random.Random(seed)
    bits = {}
    for comps in units(adapter, target).values():
        if target.fp and rng.random() < fp_share:
            continue
        # GPTQ plans (llama.cpp also serves q5_k/q6_k, which only ggml plans hold; see test_ggml_quant.py)
        b = rng.choice([w for w in target.served(comps[0].kind) if w in QuantSettings().widths])
        bits.update((c.key, b) for c in comps)
    plan = Plan(bits)
    assert not problems(plan, adapter, target)
    return plan


def decoys(name):
    """Names that are not the module but a loose pattern would take for it (rules must match none)."""
    out = [f"{name}_x", f"x.{name}"]
    m = re.search(r"(layers|blk)\.(\d+)\.", name)
    if m:  # layer 1 vs layer 11: unanchored numbers would match both
        out.append(f"{name[:m.start(2)]}{m.group(2)}1{name[m.end(2):]}")
    return out


def context(model_type, adapter, target, plan, **options):
    return Context(plan, adapter, target, model_type, "MODEL", options)


def cases(model, target, seeds=3, **options):
    """Writer contexts for several random plans that ``target`` can load."""
    model_type, _, adapter = model
    t = TARGETS[target]
    for seed in range(seeds):
        yield context(model_type, adapter, t, servable_plan(adapter, t, seed), **options)


# -- GPTQModel and vLLM ----------------------------------------------------------------------------------------
def dynamic_matches(dynamic, base, name):
    """Every rule's outcome for ``name`` in order (None = left unquantized), and the first one."""
    outcomes = []
    for pattern, override in dynamic.items():
        negative = pattern.startswith("-:")
        if re.match(pattern.removeprefix("-:").removeprefix("+:"), name):
            outcomes.append(None if negative else override.get("bits", base))
    return outcomes


@pytest.mark.parametrize("target", ["gptqmodel", "vllm"])
def test_gptqmodel_dynamic_resolves_every_module(model, target):
    model_type, _, adapter = model
    for ctx in cases(model, target):
        plan, t = ctx.plan, ctx.target
        cfg, _ = quantize_config(ctx)
        json.dumps(cfg)  # plain JSON
        base, dynamic = cfg["bits"], cfg["dynamic"]
        expected = {}
        for c in adapter.components:  # as GPTQModel quantizes them, and as the checkpoint names them
            expected[c.key] = expected[checkpoint_name(c, model_type)] = plan.bits.get(c.key)
        for m in ignored_modules(adapter):
            expected[m] = expected[checkpoint_path(m, model_type)] = None
        # vLLM's fused modules (qkv_proj, gate_up_proj, a layer's experts) where the plan serves them
        for name, comps in units(adapter, TARGETS["vllm"]).items():
            widths = {plan.bits.get(c.key) for c in comps}
            if name != comps[0].key and len(widths) == 1:
                expected[name] = expected[checkpoint_path(name, model_type)] = widths.pop()
        for name, bits in expected.items():
            outcomes = dynamic_matches(dynamic, base, name)
            assert len(set(outcomes)) <= 1, (name, outcomes)  # no two rules disagree
            assert (outcomes[0] if outcomes else base) == bits, name
            for d in decoys(name):
                assert not dynamic_matches(dynamic, base, d), d
        if t.sym is not None:
            assert cfg["sym"] is t.sym and cfg["desc_act"] is False


# -- llm-compressor: compressed-tensors' own parser and matcher --------------------------------------------------
def defused_stand_in(adapter):
    """A module tree with an nn.Linear at every component and ignored module, named as llm-compressor names them."""
    root = nn.Module()

    def put(name, module):
        parent = root
        *heads, last = name.split(".")
        for h in heads:
            if not hasattr(parent, h):
                parent.add_module(h, nn.Module())
            parent = getattr(parent, h)
        parent.add_module(last, module)

    for c in adapter.components:
        put(c.key, nn.Linear(c.shape[1], c.shape[0], bias=False))
    for m in ignored_modules(adapter):
        put(m, nn.Linear(8, 8, bias=False))
    return root


def test_llmcompressor_recipe_resolves_every_module_in_compressed_tensors(model):
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.utils import match_targets

    for ctx in cases(model, "llmcompressor", seeds=2):
        plan, adapter = ctx.plan, ctx.adapter
        files = llmcompressor.write(ctx).files
        mod = yaml.safe_load(files[llmcompressor.RECIPE])["quant_stage"]["quant_modifiers"]["GPTQModifier"]
        # compressed-tensors parses the groups (GPTQModifier builds this same QuantizationConfig)
        config = QuantizationConfig(config_groups=mod["config_groups"], ignore=mod["ignore"])
        tree = defused_stand_in(adapter)
        with torch.no_grad():
            apply_quantization_config(tree, config, show_progress=False)
        targets = [tg for g in config.config_groups.values() for tg in g.targets]
        for name, m in tree.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            scheme = getattr(m, "quantization_scheme", None)
            got = scheme.weights.num_bits if scheme is not None else None
            assert got == plan.bits.get(name), name  # ignored modules are not components: None
            assert len(match_targets(name, m, targets)) <= 1, name  # no module in two groups
            for d in decoys(name):
                assert not match_targets(d, m, targets + config.ignore), d


def test_llmcompressor_recipe_parses_as_written():
    from compressed_tensors.quantization import QuantizationScheme

    adapter = get_adapter(tiny_model("qwen2_moe"))
    plan = Plan({c.key: 4 for c in adapter.components}, quant=QuantSettings(group_size=-1))
    mod = yaml.safe_load(llmcompressor.write(context("qwen2_moe", adapter, TARGETS["llmcompressor"], plan))
                         .files[llmcompressor.RECIPE])["quant_stage"]["quant_modifiers"]["GPTQModifier"]
    scheme = QuantizationScheme.model_validate(mod["config_groups"]["w4"])
    assert scheme.weights.strategy == "channel" and scheme.weights.num_bits == 4
    assert mod["dampening_frac"] == plan.quant.damp and mod["actorder"] is None


# -- llama.cpp ------------------------------------------------------------------------------------------------
def llamacpp_rules(text):
    assert text.endswith("\n") and not any(line.startswith("#") for line in text.splitlines())
    rules = []
    for token in text.split():  # quantize.cpp: whitespace-separated pattern=type tokens
        pattern, _, ggml_type = token.rpartition("=")
        rules.append((re.compile(pattern.lower()), ggml_type))
    return rules


def test_llamacpp_tensor_types_resolve_every_tensor(model):
    adapter = model[2]
    types = llamacpp.parse_types("2=iq2_xs,fp=bf16")
    for ctx in cases(model, "llamacpp", ggml_types=types):
        plan = ctx.plan
        rules = llamacpp_rules(llamacpp.write(ctx).files[llamacpp.FILE])
        expected = {}
        for c in adapter.components:
            for name in llamacpp.gguf_names(c):
                b = plan.bits.get(c.key)
                expected[f"{name}.weight"] = types["fp" if b is None else b]
        for layer in range(adapter.num_layers):
            for r in llamacpp.ROUTERS + ("attn_norm", "ffn_norm", "attn_sinks"):
                expected[f"blk.{layer}.{r}.weight"] = None
        expected.update({"token_embd.weight": None, "output.weight": None, "output_norm.weight": None})
        for name, ggml_type in expected.items():
            hits = [ty for rx, ty in rules if rx.search(name)]
            assert len(set(hits)) <= 1, (name, hits)
            assert (hits[0] if hits else None) == ggml_type, name
            for d in decoys(name):
                assert not [ty for rx, ty in rules if rx.search(d)], d


def test_llamacpp_says_when_deepseek_would_convert_to_softmax_routing():
    """Without "scoring_func" in config.json llama.cpp's converter writes no gating function and
    llama.cpp routes DeepSeek-V3 with softmax, where transformers routes it with sigmoid."""
    for scoring in (None, "sigmoid"):
        model = tiny_model("deepseek_v3")
        if scoring:
            model.config.scoring_func = scoring
        adapter = get_adapter(model)
        notes = llamacpp.write(context("deepseek_v3", adapter, TARGETS["llamacpp"], Plan.uniform(adapter, 4))).notes
        assert any("scoring_func" in n for n in notes) == (scoring is None), notes


def test_llamacpp_base_ftype_follows_the_average_width(model):
    """The base ftype sets token_embd and output: the mixture of the width nearest the plan's average,
    not its most common width (most weights at 3 bits, the average above 4: Q4_K_M)."""
    model_type, _, adapter = model
    comps = sorted(adapter.components, key=lambda c: -c.params)
    total = sum(c.params for c in comps)
    bits, held = {}, 0
    for c in comps:  # the largest components at 3 bits until they hold over half the parameters
        bits[c.key] = 3 if held < total / 2 else 8
        held += c.params
    plan = Plan(bits)
    ctx = context(model_type, adapter, TARGETS["llamacpp"], plan)
    avg = plan.avg_bits(adapter)
    expected = {2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0"}[
        min((2, 3, 4, 5, 6, 8), key=lambda b: (abs(b - avg), -b))]
    assert llamacpp.write(ctx).next.split()[-1] == expected, avg
    ctx = context(model_type, adapter, TARGETS["llamacpp"], Plan({c.key: 2 for c in comps}))
    assert llamacpp.write(ctx).next.split()[-1] == "Q2_K"


def test_llamacpp_base_width_is_the_nearest_to_the_average():
    """A plan just under its budget keeps the budget's mixture (2.99 bits: Q3_K_M's, not Q2_K's)."""
    from types import SimpleNamespace

    for avg, want in [(2.0, 2), (2.49, 2), (2.5, 3), (2.99, 3), (3.49, 3), (3.99, 4), (4.6, 5), (5.9, 6), (7.1, 8)]:
        plan = SimpleNamespace(avg_bits=lambda adapter, a=avg: a, quant=QuantSettings())
        assert llamacpp.base_width(SimpleNamespace(plan=plan, adapter=None)) == want, avg
    # a ggml plan's average is in its types' real bits (q4_k 4.5, q5_k 5.5): 4.6 is q4_k's size
    for avg, want in [(2.7, 2), (4.6, 4), (5.2, 5), (7.6, 8)]:
        plan = SimpleNamespace(avg_bits=lambda adapter, a=avg: a, quant=QuantSettings(method="ggml"))
        assert llamacpp.base_width(SimpleNamespace(plan=plan, adapter=None)) == want, avg


def test_gguf_names_match_the_converters_tensor_map(model):
    import gguf
    model_type, _, adapter = model
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == llamacpp.GGUF_ARCH[model_type])
    tmap = gguf.get_tensor_name_map(arch, adapter.num_layers)
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    for c in adapter.components:
        if model_type == "qwen3_moe" and c.kind == "dense":
            continue  # GGUF qwen3moe has no dense FFN tensors: such a model does not convert (DESIGN.md)
        hf = checkpoint_name(c, model_type)
        if c.kind == "expert":  # the converter stacks experts into one tensor named without the index
            head, _, proj = hf.rpartition(".")
            hf = f"{head.rpartition('.')[0]}.{proj}"
        mine = llamacpp.gguf_names(c)
        assert tmap.get_name(hf) == mine[0], c.key
        assert all(n.replace(f"blk.{c.layer}.", "blk.{bid}.") in known for n in mine), c.key
    for name in llamacpp.ROUTERS:
        assert any(gguf.TENSOR_NAMES[t] == f"blk.{{bid}}.{name}" for t in gguf.MODEL_TENSOR)


def test_ggml_type_names_are_ggmls():
    import gguf
    assert set(llamacpp.GGML_TYPE_NAMES) <= {t.name.lower() for t in gguf.GGMLQuantizationType}


# -- exllamav3 ------------------------------------------------------------------------------------------------
def exl3_source(spec, tensor):
    """recompile.py: one collection per model_dir in order of first use, each added in front of the others,
    globs fullmatched; tensors no glob matches come from the base (-i) model."""
    dirs = {s["id"]: s["model_dir"] for s in spec["sources"]}
    by_dir: dict[str, list[str]] = {}
    for o in spec["overrides"]:
        by_dir.setdefault(dirs[o["source"]], []).append(o["key"])
    for d, globs in reversed(list(by_dir.items())):
        if any(fnmatchcase(tensor, g) for g in globs):  # '*' spans dots, as in compile_star_globs
            return d
    return None


def test_exl3_overrides_resolve_every_tensor(model):
    model_type, _, adapter = model
    for ctx in cases(model, "exl3"):
        plan = ctx.plan
        base, spec = exl3.overrides(ctx)
        spec = yaml.safe_load(yaml.safe_dump(spec))
        width = {s["model_dir"]: s["id"] for s in spec["sources"]}
        for c in adapter.components:
            for suffix in ("trellis", "suh", "svh"):
                tensor = f"{checkpoint_name(c, model_type)}.{suffix}"
                hits = {o["source"] for o in spec["overrides"] if fnmatchcase(tensor, o["key"])}
                assert len(hits) <= 1, tensor
                d = exl3_source(spec, tensor)
                assert (width[d] if d else base) == plan.bits[c.key], tensor
                assert not [o for x in decoys(checkpoint_name(c, model_type))
                            for o in spec["overrides"] if fnmatchcase(f"{x}.{suffix}", o["key"])]
        for m in ignored_modules(adapter):  # routers come from the base model as they are
            assert exl3_source(spec, f"{checkpoint_path(m, model_type)}.weight") is None


def test_exl3_refuses_full_precision_components():
    adapter = get_adapter(tiny_model("mixtral"))
    plan = Plan({c.key: 4 for c in adapter.components if c.kind == "expert"})
    assert any("quantizes every linear layer" in p for p in problems(plan, adapter, TARGETS["exl3"]))


# -- json -----------------------------------------------------------------------------------------------------
def test_json_is_the_plan(model):
    for ctx in cases(model, "json", seeds=1):
        assert json.loads(FORMATS["json"](ctx).files["bits.json"]) == ctx.plan.bits
