"""llama.cpp's quantizers through ggml (paretoq.quant.ggml): sizes, an independent reference, and
round trips through gguf's own dequantizers. Byte identity with llama-quantize's output is checked
by studies/llamacpp/ggml_bytes.py (it needs a llama.cpp build)."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from paretoq.errors import ParetoqError
from paretoq.quant import ggml
from paretoq.quant.settings import GGML_TYPES

# llama.cpp's own figures (ggml-common.h block layouts): bits per weight, scales included
BPW = {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625, "q8_0": 8.5, "q4_0": 4.5,
       "q5_0": 5.5, "q5_1": 6.0, "iq4_xs": 4.25, "f16": 16.0}


def _w(rows=6, n=512, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, n)).astype(np.float32)


@pytest.mark.parametrize("name, bpw", BPW.items())
def test_bytes_per_type(name, bpw):
    W = _w()
    data = ggml.quantize(W, name)
    assert ggml.bits_per_weight(name) == bpw
    assert data.dtype == np.uint8 and data.shape == (W.shape[0], W.shape[1] * bpw / 8)


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q5_0"])
def test_equal_to_gguf_pys_own_quantizer(name):
    """gguf-py reimplements these in numpy: the same bytes from two implementations."""
    W = _w(seed=1) * 3
    assert np.array_equal(ggml.quantize(W, name), gguf_quantize(W, GGMLQuantizationType[name.upper()]))


def test_round_trip_error_falls_with_the_bits():
    W = _w(rows=16, seed=2)
    rel = {t: float(np.linalg.norm(ggml.round_trip(W, t) - W) / np.linalg.norm(W))
           for t in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")}
    order = sorted(rel, key=lambda t: BPW[t])
    assert [rel[t] for t in order] == sorted(rel.values(), reverse=True), rel
    # a wrong block layout would dequantize to noise (relative error near or above 1)
    assert rel["q2_k"] < 0.4 and rel["q4_k"] < 0.1 and rel["q8_0"] < 0.01, rel


@pytest.mark.parametrize("name", ["q2_k", "q4_k", "q6_k", "q8_0", "iq4_xs"])
def test_rows_quantized_on_threads_are_the_bytes_of_one_call(name, monkeypatch):
    """Chunks of rows on threads write each row where one call would: 7 rows on 3 threads, with and
    without an importance matrix (a chunk at the wrong offset would leave zeros or move rows)."""
    W = _w(rows=7, n=256, seed=5)
    importance = np.random.default_rng(6).lognormal(0, 1, W.shape[1]).astype(np.float32)
    monkeypatch.setattr(ggml, "threads", lambda: 1)
    one = [ggml.quantize(W, name, imp) for imp in (None, importance)]
    monkeypatch.setattr(ggml, "threads", lambda: 3)
    monkeypatch.setattr(ggml, "MIN_CHUNK_WEIGHTS", 256)
    assert [c[1] for c in ggml.row_chunks(7, 256, 3)] == [2, 2, 3]
    for imp, expected in zip((None, importance), one):
        assert np.array_equal(ggml.quantize(W, name, imp), expected)


def test_row_chunks_cover_every_row_once():
    for rows, n, workers in ((1, 4096, 8), (5, 64, 8), (1000, 2048, 16), (3, 1 << 20, 2)):
        chunks = ggml.row_chunks(rows, n, workers)
        assert [first for first, _ in chunks] == [sum(c for _, c in chunks[:i]) for i in range(len(chunks))]
        assert sum(c for _, c in chunks) == rows and all(c > 0 for _, c in chunks) and len(chunks) <= workers
    assert len(ggml.row_chunks(5, 64, 8)) == 1  # 320 weights: not worth a thread


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k"])
def test_an_importance_matrix_lowers_the_weighted_error(name):
    """ggml's K-quants minimise the importance-weighted error when given one: columns with large
    activations come out closer."""
    W = _w(rows=32, seed=3)
    importance = np.random.default_rng(4).lognormal(0, 2, W.shape[1]).astype(np.float32)

    def weighted(R):
        return float((((R - W) ** 2) * importance).sum())

    assert weighted(ggml.round_trip(W, name, importance)) < 0.95 * weighted(ggml.round_trip(W, name))


def test_refusals_name_the_fix():
    with pytest.raises(ParetoqError, match="blocks are 256 wide; choose one of q8_0, q4_0, q5_0, q5_1, iq4_nl, f16$"):
        ggml.quantize(_w(n=96), "q4_k")
    with pytest.raises(ParetoqError, match="needs an importance matrix"):
        ggml.quantize(_w(), "iq2_xs")
    with pytest.raises(ParetoqError, match="not a ggml type"):
        ggml.quantize(_w(), "q4_k_m")
    assert ggml.round_trip(_w(), "iq2_xs", np.ones(512, np.float32)).shape == (6, 512)


def test_rows_a_type_cannot_tile_take_llama_quantizes_fallback():
    """llama-quantize's tensor_type_fallback (src/llama-quant.cpp): a K-quant on rows that are not a
    multiple of 256 wide (GPT-OSS's 2880) is stored as a 32-block type, and rows that are not a
    multiple of 32 as f16. Each fallback quantizes through ggml and dequantizes through gguf."""
    asked = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "iq2_xs", "q4_0")
    assert [ggml.stored_type(t, 2816) for t in asked] == list(asked)  # 11 x 256: every block fits
    assert [ggml.stored_type(t, 2880) for t in asked] == ["q4_0", "q4_0", "q5_0", "q5_1", "q8_0", "q8_0", "iq4_nl",
                                                           "q4_0"]
    assert {ggml.stored_type(t, 48) for t in asked} == {"f16"}
    W = _w(n=2880, seed=5)
    rel = {t: float(np.linalg.norm(ggml.round_trip(W, t) - W) / np.linalg.norm(W))
           for t in ("q4_0", "q5_0", "q5_1", "q8_0", "iq4_nl", "f16")}
    assert rel["q4_0"] > rel["q5_0"] > rel["q5_1"] > rel["q8_0"] > rel["f16"] and rel["q4_0"] < 0.15, rel


# -- the ggml quant method: the quant cache, plans and eval ---------------------------------------

K_WIDE = dict(hidden_size=256, moe_intermediate_size=256, intermediate_size=256, head_dim=64, num_attention_heads=4,
              num_key_value_heads=2)  # every input width a multiple of 256, as K-quants need


@pytest.fixture(scope="module")
def k_model(tmp_path_factory):
    from conftest import save_tiny_with_demo_tokenizer

    return save_tiny_with_demo_tokenizer(tmp_path_factory.mktemp("k_qwen3_moe"), "qwen3_moe", **K_WIDE)


def test_the_cache_holds_what_llama_quantize_makes_with_paretoqs_imatrix(k_model, tmp_path):
    """Each component's bytes in the ggml quant cache are ggml's quantization of its weights with
    the importance `paretoq imatrix` writes for it: what llama-quantize --imatrix makes of the
    tensor (studies/llamacpp/ggml_bytes.py shows ggml's bytes equal llama-quantize's)."""
    from paretoq.calibrate import prepare
    from paretoq.data import load_token_sets
    from paretoq.export.imatrix import imatrix, tensor_name
    from paretoq.quant.quantizer import GGMLTensor, QuantSettings
    from paretoq.walk import open_model

    tokens = dict(calib_tokens=256, eval_tokens=256, seq_len=32)
    _, im = imatrix(str(k_model), tmp_path / "im.gguf", progress=False, **tokens)
    sm = open_model(str(k_model), max_memory="0")
    sets = load_token_sets(sm.loaded.tokenizer, "demo", **tokens)
    prep = prepare(sm, sets.calib, {}, QuantSettings(method="ggml"), (2, 5), features=False, progress=False)
    checked = 0
    for c in sm.adapter.components:
        name = tensor_name(c)
        row = c.expert if c.kind == "expert" else 0
        importance = im.mean_square(name)[row] if im.counts[name][row] >= 4 else None
        with sm.layer(c.layer):
            W = sm.adapter.weight(c.key).detach().float().numpy()
        for b, t in ((2, "q2_k"), (5, "q5_k")):
            got = prep.cache.get(c.key, b)
            assert isinstance(got, GGMLTensor) and got.ggml_type == t
            np.testing.assert_array_equal(got.data.numpy(), ggml.quantize(W, t, importance), err_msg=c.key)
            checked += 1
    assert checked == 2 * len(sm.adapter.components)


def test_plan_budget_in_real_bits_by_hand(k_model):
    from paretoq.models import load_model
    from paretoq.plan import Plan
    from paretoq.quant.quantizer import QuantSettings

    adapter = load_model(str(k_model), weights=False).adapter
    bits = {c.key: 2 if c.kind == "expert" else 8 for c in adapter.components}
    plan = Plan(bits, quant=QuantSettings(method="ggml"))
    experts = sum(c.params for c in adapter.components if c.kind == "expert")
    rest = sum(c.params for c in adapter.components if c.kind != "expert")
    assert plan.avg_bits(adapter, over="plan") == pytest.approx((experts * 2.625 + rest * 8.5) / (experts + rest))
    assert plan.size_bytes(adapter) == (experts * 2.625 + rest * 8.5) / 8
    assert plan.effective_bits(adapter, over="plan") == pytest.approx(plan.avg_bits(adapter, over="plan"))
    back = Plan.from_dict(plan.to_dict())
    assert back.quant.method == "ggml" and back.bits == bits


def test_a_ggml_plan_prices_rows_k_quants_cannot_tile_at_the_fallback_by_hand(tiny_model_dir):
    """Every input width of the tiny model (64, 128, 32) is a multiple of 32 but not of 256: a
    K-quant plan is stored, and so priced, as llama-quantize's fallback types."""
    from paretoq.models import load_model
    from paretoq.plan import Plan
    from paretoq.quant.quantizer import QuantSettings
    from paretoq.space import SearchSpace, make_groups

    adapter = load_model(str(tiny_model_dir), weights=False).adapter
    ggml_settings = QuantSettings(method="ggml")
    params = sum(c.params for c in adapter.components)
    for width, bpw in ((2, 4.5), (4, 5.5), (5, 6.0), (6, 8.5), (8, 8.5)):  # q4_0, q5_0, q5_1, q8_0, q8_0
        plan = Plan.uniform(adapter, width, quant=ggml_settings)
        plan.validate(adapter)
        assert plan.avg_bits(adapter, over="plan") == pytest.approx(bpw)
        assert plan.size_bytes(adapter) == params * bpw / 8
    space = SearchSpace("t", "layer-experts", {"attn": (2, 6), "expert": (2, 4, 8)}, ())
    for g in make_groups(adapter, space, ggml_settings.budget_bits):
        assert g.costs == ((4.5, 8.5) if g.kind == "attn" else (4.5, 5.5, 8.5)), g
    with pytest.raises(ParetoqError, match="does not offer"):
        Plan.uniform(adapter, 5).validate(adapter)  # GPTQ has no 5 bits
    with pytest.raises(ParetoqError, match="maps widths to ggml types"):
        QuantSettings.from_dict({"method": "ggml", "types": {"4": "q4_0"}})


def test_quantize_refuses_a_ggml_plan(k_model, tmp_path):
    import subprocess
    import sys

    from paretoq.models import load_model
    from paretoq.plan import Plan
    from paretoq.quant.quantizer import QuantSettings

    adapter = load_model(str(k_model), weights=False).adapter
    Plan.uniform(adapter, 4, quant=QuantSettings(method="ggml")).save(tmp_path / "plan.json")
    r = subprocess.run([sys.executable, "-m", "paretoq.cli", "quantize", "--model", str(k_model), "--plan",
                        str(tmp_path / "plan.json"), "--out", str(tmp_path / "q")], capture_output=True, text=True)
    assert r.returncode == 2 and "export --format llamacpp" in r.stderr and not (tmp_path / "q").exists(), r.stderr


def test_a_search_for_llamacpp_measures_ggml_types_at_their_real_size(k_model, tmp_path):
    """--target llamacpp: the choices are llama.cpp's types (q5_k and q6_k too), each trial's
    average is in the types' real bits, and the plan is a ggml plan within the budget."""
    import optuna

    from paretoq.models import load_model
    from paretoq.plan import Plan
    from paretoq.search import SearchConfig, run_search

    storage = f"sqlite:///{tmp_path / 'cpp.db'}"
    run_search(SearchConfig(budget=4.0, model=str(k_model), trials=8, round_size=4, calib_tokens=256, eval_tokens=256,
                            seq_len=32, sensitivity_tokens=64, study="cpp", storage=storage, out=tmp_path / "out",
                            progress=False, target="llamacpp"))
    adapter = load_model(str(k_model), weights=False).adapter
    plan = Plan.load(tmp_path / "out" / "plan.json")
    assert plan.quant.method == "ggml" and plan.avg_bits(adapter, over="plan") <= 4.0 + 1e-9
    study = optuna.load_study(study_name="cpp", storage=storage)
    assert study.user_attrs["quant"]["method"] == "ggml"
    for t in study.get_trials(states=[optuna.trial.TrialState.COMPLETE]):  # avg_bits: real bits, by Plan's arithmetic
        assert t.values[1] == pytest.approx(t.user_attrs["effective_bits"])


def test_a_search_for_llamacpp_measures_the_fallback_types_llama_quantize_stores(tiny_search_model_dir, tmp_path):
    """Rows that K-quants cannot tile (the tiny DeepSeek's widths are 64, 32 and 16) are searched as
    what llama-quantize stores for them: the cache holds ggml's bytes of the fallback type, and the
    plan's average is in those types' bits."""
    from paretoq.calibrate import prepare
    from paretoq.data import load_token_sets
    from paretoq.plan import Plan
    from paretoq.quant.quantizer import GGMLTensor, QuantSettings
    from paretoq.search import SearchConfig, run_search
    from paretoq.walk import open_model

    tokens = dict(calib_tokens=256, eval_tokens=192, seq_len=32)
    run_search(SearchConfig(budget=6.0, model=str(tiny_search_model_dir), trials=4, round_size=4, sensitivity_tokens=32,
                            study="x", storage=f"sqlite:///{tmp_path / 'x.db'}", out=tmp_path / "out", progress=False,
                            target="llamacpp", **tokens))
    sm = open_model(str(tiny_search_model_dir), max_memory="0")
    adapter = sm.adapter
    plan = Plan.load(tmp_path / "out" / "plan.json")
    assert plan.quant.method == "ggml" and plan.avg_bits(adapter, over="plan") <= 6.0 + 1e-9
    sets = load_token_sets(sm.loaded.tokenizer, "demo", **tokens)
    cache = prepare(sm, sets.calib, {}, QuantSettings(method="ggml"), tuple(sorted(set(plan.bits.values()))),
                    features=False, progress=False).cache
    seen = set()
    for c in adapter.components:
        got = cache.get(c.key, plan.bits[c.key])
        rows = ggml.gguf_rows(c, sm.model.config)  # kv_b_proj: attn_k_b's and attn_v_b's
        want = [ggml.stored_type(GGML_TYPES[plan.bits[c.key]], w) for _, w in rows]
        assert isinstance(got, GGMLTensor) and got.ggml_type == "+".join(want), c.key
        assert got.data.numel() == sum(n * ggml.row_bytes(t, w) for (n, w), t in zip(rows, want))
        seen.update(want)
    assert "f16" in seen and seen & {"q4_0", "q5_0", "q5_1", "q8_0"}, seen  # kv_b's 8- and 16-wide rows: f16


def test_deepseek_kv_b_is_quantized_and_priced_as_the_converter_splits_it():
    """llama.cpp's converter stores kv_b_proj as attn_k_b (rows qk_nope_head_dim wide: 32 on the demo,
    so q4_k falls back to q5_0) and attn_v_b (rows kv_lora_rank wide: 256, q4_k itself); the ggml
    method quantizes, and prices, those two tensors, without importance (no imatrix names them)."""
    from types import SimpleNamespace

    import torch

    from paretoq.models import load_model
    from paretoq.plan import Plan
    from paretoq.quant.apply import _ggml_components
    from paretoq.quant.quantizer import QuantSettings

    loaded = load_model("demo")
    adapter, config = loaded.adapter, loaded.model.config
    c = next(c for c in adapter.components if c.proj == "kv_b_proj")
    assert ggml.gguf_rows(c, config) == [(4 * 256, 32), (4 * 64, 256)]
    W = adapter.weight(c.key).detach().float().numpy()
    k_b, v_b = ggml.split_kv_b(W, 4, 32)
    ck, cv = torch.split(torch.from_numpy(W).view(4, 96, 256), [32, 64], dim=1)  # conversion/deepseek.py's split
    np.testing.assert_array_equal(k_b, ck.transpose(1, 2).reshape(-1, 32).numpy())
    np.testing.assert_array_equal(v_b, cv.reshape(-1, 256).numpy())
    np.testing.assert_array_equal(ggml.merge_kv_b(k_b.reshape(4, 256, 32), v_b.reshape(4, 64, 256)), W)

    q = _ggml_components(adapter, SimpleNamespace(tokens={}, hessians={}, site={}), {c.key: 4}).tensors[c.key]
    assert q.ggml_type == "q5_0+q4_k"
    want = np.concatenate([ggml.quantize(k_b, "q5_0").reshape(-1), ggml.quantize(v_b, "q4_k").reshape(-1)])
    np.testing.assert_array_equal(q.data.numpy(), want)
    back = ggml.merge_kv_b(ggml.round_trip(k_b, "q5_0").reshape(4, 256, 32), ggml.round_trip(v_b, "q4_k").reshape(4, 64, 256))
    np.testing.assert_array_equal(q.dequantize().numpy(), back)
    plan = Plan({c.key: 4}, quant=QuantSettings(method="ggml"))
    assert plan.avg_bits(adapter, over="plan") == pytest.approx((1024 * 32 * 5.5 + 256 * 256 * 4.5) / W.size)
    assert plan.size_bytes(adapter) == (1024 * 32 * 5.5 + 256 * 256 * 4.5) / 8


@pytest.mark.parametrize("name", ["q2_k", "q6_k", "q8_0", "q5_1"])
def test_rows_dequantized_a_chunk_at_a_time_equal_one_gguf_call(name, monkeypatch):
    from gguf.quants import dequantize as gguf_dequantize

    monkeypatch.setattr(ggml, "DEQUANTIZE_CHUNK_BYTES", 1000)  # a few rows a chunk, the last one shorter
    data = ggml.quantize(_w(rows=37, n=512, seed=3), name)
    got = ggml.dequantize(data, name)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, gguf_dequantize(data, GGMLQuantizationType[name.upper()]))


def test_the_streamed_cache_bound_follows_each_quantizers_bytes():
    """One layer's entries at every width: GPTQ codes a byte each, ggml types their own bytes."""
    from paretoq.calibrate import entry_bytes_per_weight
    from paretoq.quant.quantizer import QuantSettings

    assert entry_bytes_per_weight(QuantSettings(), (2, 4)) == pytest.approx(2 * 1.25)
    assert entry_bytes_per_weight(QuantSettings(method="ggml"), (2, 8)) == pytest.approx((2.625 + 8.5) / 8 * 1.25)


def test_a_stacked_tensor_dequantized_a_chunk_of_its_first_axis_at_a_time_equals_one_gguf_call(monkeypatch):
    """3-D tensors (a GGUF's attn_k_b [heads, rank, nope]) go through the same chunked path."""
    from gguf.quants import dequantize as gguf_dequantize

    monkeypatch.setattr(ggml, "DEQUANTIZE_CHUNK_BYTES", 1000)
    data = ggml.quantize(_w(rows=5 * 12, n=256, seed=4), "q4_k").reshape(5, 12, -1)
    got = ggml.dequantize_rows(data, GGMLQuantizationType.Q4_K)
    assert got.shape == (5, 12, 256)
    np.testing.assert_array_equal(got, gguf_dequantize(data, GGMLQuantizationType.Q4_K))
