"""The token embedding and output head as optional plan components (llama.cpp's types only):
found by the adapter, priced by hand, quantized as llama-quantize quantizes them (ggml, no
importance), measured by the evaluator as a whole-model forward measures them, searched by
``--target llamacpp`` and exported as tensor-type lines."""

import numpy as np
import pytest
import torch

from paretoq.errors import ParetoqError
from paretoq.quant import ggml
from paretoq.quant.settings import GGML_TYPES

K_WIDE = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=256, head_dim=64, num_attention_heads=4,
              num_key_value_heads=2)  # every input width a multiple of 256, as K-quants need
TOKENS = dict(calib_tokens=256, eval_tokens=192, seq_len=32)


@pytest.fixture(scope="module")
def k_model(tmp_path_factory):
    from conftest import save_tiny_with_demo_tokenizer

    return save_tiny_with_demo_tokenizer(tmp_path_factory.mktemp("k_qwen3_moe"), "qwen3_moe", **K_WIDE)


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    from conftest import save_tiny_with_demo_tokenizer

    return save_tiny_with_demo_tokenizer(tmp_path_factory.mktemp("tied"), "qwen3_moe", tie_word_embeddings=True,
                                         **K_WIDE)


def _ggml():
    from paretoq.quant.quantizer import QuantSettings

    return QuantSettings(method="ggml")


def test_the_adapter_finds_them_apart_from_the_layers(k_model, tied_model):
    from paretoq.models import load_model

    a = load_model(str(k_model)).adapter
    assert [(c.key, c.kind, c.layer, c.shape) for c in a.outer] == [
        ("model.embed_tokens", "embed", -1, (4096, 256)), ("lm_head", "head", a.num_layers, (4096, 256))]
    assert not {c.key for c in a.outer} & {c.key for c in a.components}  # the layer stages never see them
    assert a.weight("lm_head") is a.model.lm_head.weight
    tied = load_model(str(tied_model)).adapter
    assert [c.kind for c in tied.outer] == ["embed"]  # tied: one tensor, GGUF's token_embd


def test_plan_arithmetic_by_hand(k_model):
    from paretoq.models import load_model
    from paretoq.plan import Plan

    a = load_model(str(k_model), weights=False).adapter
    layers = sum(c.params for c in a.components)
    outer = 2 * 4096 * 256
    bits = {c.key: 4 for c in a.components} | {"model.embed_tokens": 6, "lm_head": 2}
    plan = Plan(bits, quant=_ggml())
    want = (layers * 4.5 + 4096 * 256 * (6.5625 + 2.625)) / (layers + outer)  # q4_k, q6_k, q2_k
    assert plan.avg_bits(a, over="plan") == pytest.approx(want)
    assert plan.avg_bits(a) == pytest.approx(want)  # every component named: the model's average is the plan's
    assert plan.size_bytes(a) == pytest.approx((layers * 4.5 + 4096 * 256 * (6.5625 + 2.625)) / 8)
    # a plan that leaves them out reports over the layers' components, as before
    inner = Plan({c.key: 4 for c in a.components}, quant=_ggml())
    assert inner.avg_bits(a) == pytest.approx(4.5)
    with pytest.raises(ParetoqError, match="only llama.cpp's types"):
        Plan({"lm_head": 4}).validate(a)  # GPTQ


def test_the_cache_quantizes_them_as_llama_quantize_does(k_model, tmp_path, monkeypatch):
    """No importance (llama-imatrix collects none for token_embd, nor output.weight by default),
    the type's bytes from ggml, and the squared error as the loss."""
    monkeypatch.setenv("PARETOQ_CACHE", str(tmp_path / "cache"))
    from paretoq.calibrate import prepare
    from paretoq.data import load_token_sets
    from paretoq.walk import open_model

    sm = open_model(str(k_model), max_memory="0")
    sets = load_token_sets(sm.loaded.tokenizer, "demo", **TOKENS)
    cache = prepare(sm, sets.calib, {}, _ggml(), (2, 6), features=False, progress=False).cache
    cache.fill_outer({"model.embed_tokens", "lm_head"}, (2, 6))
    for c in sm.adapter.outer:
        W = sm.adapter.weight(c.key).detach().float().numpy()
        for b, t in ((2, "q2_k"), (6, "q6_k")):
            got = cache.get(c.key, b)
            assert got.ggml_type == t and cache.path(c.layer, b).name == f"{c.kind}-{b}bit.safetensors"
            np.testing.assert_array_equal(got.data.numpy(), ggml.quantize(W, t))
            err = float(((W - ggml.dequantize(got.data.numpy(), t)) ** 2).sum())
            assert cache.loss[(c.key, b)] == pytest.approx(err, rel=1e-5)
        assert cache.loss[(c.key, 2)] > 4 * cache.loss[(c.key, 6)]


@pytest.mark.parametrize("which", ["k_model", "tied_model"])
def test_the_walk_measures_them_as_a_whole_model_forward_does(which, request, tmp_path, monkeypatch):
    """A streamed evaluator, reusing its prefix across plans, equals the model held whole with the
    same weights written in by hand; an embedding change reruns every layer, a head change none, and
    the model's own weights are back after each plan (a tied head follows the embedding)."""
    monkeypatch.setenv("PARETOQ_CACHE", str(tmp_path / "cache"))
    from paretoq.calibrate import prepare
    from paretoq.data import load_token_sets
    from paretoq.evaluate import StreamedEvaluator, evaluate
    from paretoq.models import load_model
    from paretoq.walk import open_model

    path = request.getfixturevalue(which)
    sm = open_model(str(path), max_memory="0")
    sets = load_token_sets(sm.loaded.tokenizer, "demo", **TOKENS)
    prep = prepare(sm, sets.calib, {"eval": sets.eval}, _ggml(), (2, 4), features=False, progress=False)
    outer = [c.key for c in sm.adapter.outer]
    prep.cache.fill_outer(set(outer), (2, 4))
    ev = StreamedEvaluator(sm, prep.cache.weight, {"eval": sets.eval}, prep.references)
    before = {k: sm.adapter.weight(k).detach().clone() for k in outer}
    layer = {c.key: 4 for c in sm.adapter.components if c.layer == sm.num_layers - 1}
    plans = [layer | {outer[0]: 2}, layer | {k: 2 for k in outer}, layer | {outer[-1]: 2} | {outer[0]: 4}, layer]
    n = sm.num_layers
    whole = load_model(str(path)).model
    from paretoq.models import get_adapter

    wa = get_adapter(whole)
    for i, bits in enumerate(plans):
        run = ev.layers_run
        got = ev.evaluate(bits, "eval")
        with torch.no_grad():
            saved = {k: wa.weight(k).detach().clone() for k in bits}
            for k, b in bits.items():
                wa.set_weight(k, prep.cache.weight(k, b))
            want = evaluate(whole, prep.references["eval"])
            for k, W in saved.items():
                wa.set_weight(k, W)
        assert got.kl == pytest.approx(want.kl, rel=1e-4) and got.ppl == pytest.approx(want.ppl, rel=1e-5), (which, i)
        for k in outer:  # the originals are back
            assert torch.equal(sm.adapter.weight(k), before[k])
        if i == 1 and len(outer) == 2:  # only the head changed: the layers' outputs are reused
            assert ev.layers_run == run
        if i in (2, 3):  # the embedding changed: every layer again
            assert ev.layers_run == run + n
    assert ev.evaluate(plans[1], "eval").kl > ev.evaluate(layer, "eval").kl


def test_a_llamacpp_search_plans_and_exports_them(k_model, tmp_path, monkeypatch):
    monkeypatch.setenv("PARETOQ_CACHE", str(tmp_path / "cache"))
    from paretoq.export.common import Context
    from paretoq.export.llamacpp import lines
    from paretoq.export.targets import TARGETS
    from paretoq.models import load_model
    from paretoq.plan import Plan
    from paretoq.search import SearchConfig, run_search

    run_search(SearchConfig(budget=3.5, model=str(k_model), trials=6, round_size=3, sensitivity_tokens=64,
                            study="cpp", storage=f"sqlite:///{tmp_path / 'cpp.db'}", out=tmp_path / "out",
                            progress=False, target="llamacpp", **TOKENS))
    a = load_model(str(k_model), weights=False).adapter
    plan = Plan.load(tmp_path / "out" / "plan.json")
    assert {"model.embed_tokens", "lm_head"} <= set(plan.bits)
    assert plan.avg_bits(a, over="plan") <= 3.5 + 1e-9
    types = dict(line.split("=") for line in lines(Context(plan, a, TARGETS["llamacpp"], "qwen3_moe", str(k_model))))
    assert types[r"^token_embd\.weight$"] == GGML_TYPES[plan.bits["model.embed_tokens"]]
    assert types[r"^output\.weight$"] == GGML_TYPES[plan.bits["lm_head"]]
    without = Plan({c.key: 4 for c in a.components}, quant=_ggml())
    assert not any(line.startswith((r"^token_embd", r"^output"))
                   for line in lines(Context(without, a, TARGETS["llamacpp"], "qwen3_moe", str(k_model))))  # left to the base


def test_a_gptq_search_refuses_them_before_any_work(k_model, tmp_path):
    import yaml

    from paretoq.search import SearchConfig, run_search

    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump({"granularity": "expert", "bits": {"expert": [2, 4], "embed": [4, 8]}}))
    with pytest.raises(ParetoqError, match="only llama.cpp's types"):
        run_search(SearchConfig(budget=3.0, model=str(k_model), space=str(space), study="g",
                                storage=f"sqlite:///{tmp_path / 'g.db'}", out=tmp_path / "out", progress=False,
                                **TOKENS))
    assert not (tmp_path / "out").exists()


def test_rows_quantized_a_chunk_at_a_time_are_the_bytes_of_one_call(k_model, monkeypatch):
    from paretoq.models import load_model
    from paretoq.quant import apply

    a = load_model(str(k_model)).adapter
    monkeypatch.setattr(apply, "OUTER_CHUNK_WEIGHTS", 300 * 256)  # 300 rows a chunk: the last one shorter
    got = apply.quantize_outer(a, {"lm_head": 3}, _ggml())
    W = a.weight("lm_head").detach().float().numpy()
    np.testing.assert_array_equal(got.tensors["lm_head"].data.numpy(), ggml.quantize(W, "q3_k"))
    assert got.loss["lm_head"] == pytest.approx(float(((W - ggml.round_trip(W, "q3_k")) ** 2).sum()), rel=1e-5)
