"""The layer walk gives what the whole model in memory gives: the same forward, the same quant-cache
codes, the same KL, the same sequentially quantized checkpoint."""

import pytest
import torch
import torch.nn.functional as F

from conftest import MOE_TYPES, tiny_model
from paretoq.calibrate import prepare
from paretoq.capture import capture, expert_chunks
from paretoq.data import TokenSet
from paretoq.evaluate import Assembler, StreamedEvaluator, compute_reference, evaluate
from paretoq.models import get_adapter, load_model
from paretoq.plan import Plan
from paretoq.quant.cache import QuantCache
from paretoq.quant.checkpoint import read_quantized
from paretoq.quant.pack import unpack
from paretoq.quant.quantizer import QuantSettings
from paretoq.quant.sequential import quantize, sequential_gptq
from paretoq.walk import open_model, parse_size


def _ids(vocab: int, n: int = 5, t: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", MOE_TYPES + ["llama"])
def test_streamed_forward_is_bit_identical(tmp_path, model_type):
    """Layer by layer from the shards (sharded on disk, experts stored one by one) = the model's own forward."""
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    sm = open_model(tmp_path, dtype="float32", max_memory=0)
    assert not sm.resident
    ids = _ids(model.config.vocab_size)
    hidden = sm.embed(ids, 2)
    for i in range(sm.num_layers):
        with sm.layer(i) as layer:
            hidden = [sm.run(i, layer, h, tuple(ids[2 * j : 2 * j + 2].shape)) for j, h in enumerate(hidden)]
        assert all(p.device.type == "meta" for p in sm.layers[i].parameters())  # freed
    got = torch.cat([sm.logprobs(h) for h in hidden])
    with torch.no_grad():
        want = torch.cat([F.log_softmax(model(ids[j : j + 2]).logits[:, :-1].float(), -1) for j in range(0, 5, 2)])
    assert torch.equal(got, want)


def test_calibration_walk_matches_the_in_memory_path(tiny_search_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PARETOQ_CACHE", str(tmp_path / "cache"))
    full = load_model(tiny_search_model_dir)
    calib, evals = TokenSet(_ids(128, 6, 32, 1), "c"), TokenSet(_ids(128, 5, 32, 2), "e")
    settings = QuantSettings(group_size=32)
    old = QuantCache(full.adapter, capture(full.adapter, calib, progress=False), "old", settings, root=tmp_path / "old")
    ref = compute_reference(full.model, evals)

    sm = open_model(tiny_search_model_dir, max_memory=0)
    prep = prepare(sm, calib, {"eval": evals}, settings, (2, 4), features=False, progress=False)
    assert prep.walked and prep.references["eval"].nll == pytest.approx(ref.nll, rel=1e-6)
    for c in full.adapter.components:
        for b in (2, 4):
            assert torch.equal(old.get(c.key, b).codes, prep.cache.get(c.key, b).codes), (c.key, b)
    ev = StreamedEvaluator(sm, prep.cache.weight, {"eval": evals}, prep.references)
    uniform = Plan.uniform(full.adapter, 2).bits
    last = max(c.layer for c in full.adapter.components)
    one_change = {**uniform, next(c.key for c in full.adapter.components if c.layer == last): 4}
    for bits, layers_run in ((uniform, sm.num_layers), (one_change, 1)):
        before = ev.layers_run
        got = ev.evaluate(bits, "eval")
        assert ev.layers_run - before == layers_run  # a plan that shares a prefix starts after it
        with Assembler(full.adapter, old.weight).apply(bits):
            want = evaluate(full.model, ref)
        assert abs(got.kl - want.kl) <= 1e-5 * want.kl and got.ppl == pytest.approx(want.ppl, rel=1e-6)
    again = prepare(open_model(tiny_search_model_dir, max_memory=0), calib, {"eval": evals}, settings, (2, 4), features=False,
                    progress=False)
    assert not again.walked  # a second run finds every entry


def test_two_parts_in_one_walk_equal_two_walks(tiny_search_model_dir, tmp_path, monkeypatch):
    """`evaluate_parts` reads each layer once for both parts and gives each part what its own walk
    gives; each part keeps its own prefix, so a later plan restarts each where it changed."""
    monkeypatch.setenv("PARETOQ_CACHE", str(tmp_path / "cache"))
    calib = TokenSet(_ids(128, 6, 32, 1), "c")
    parts = {"select": TokenSet(_ids(128, 5, 32, 2), "s"), "test": TokenSet(_ids(128, 3, 32, 3), "t")}
    settings = QuantSettings(group_size=32)
    sm = open_model(tiny_search_model_dir, max_memory=0)
    prep = prepare(sm, calib, parts, settings, (2, 4), features=False, progress=False)
    adapter = sm.adapter
    uniform = {c.key: 2 for c in adapter.components}
    last = max(c.layer for c in adapter.components)
    one_change = {**uniform, next(c.key for c in adapter.components if c.layer == last): 4}
    together = StreamedEvaluator(sm, prep.cache.weight, parts, prep.references)
    apart = StreamedEvaluator(sm, prep.cache.weight, parts, prep.references)
    together.evaluate(uniform, "select")  # only "select" has a prefix: "test" must start at layer 0
    apart.evaluate(uniform, "select")
    for bits, layers_run in ((one_change, sm.num_layers + 1), (uniform, 2)):
        before = together.layers_run
        got = together.evaluate_parts(bits, ("select", "test"))
        assert together.layers_run - before == layers_run
        for part in parts:
            want = apart.evaluate(bits, part)
            assert got[part].kl == pytest.approx(want.kl, rel=1e-6, abs=1e-12), part
            assert got[part].ppl == pytest.approx(want.ppl, rel=1e-6) and got[part].kl_windows == pytest.approx(
                want.kl_windows, rel=1e-6, abs=1e-12)
    assert got["select"].tokens != got["test"].tokens  # two parts, not one measured twice


def test_quantize_in_one_walk_matches_layer_by_layer_capture(tiny_search_model_dir, tmp_path):
    full = load_model(tiny_search_model_dir)
    comps = full.adapter.components
    plan = Plan({c.key: (2, 3, 4, 8)[i % 4] for i, c in enumerate(comps) if i % 5}, QuantSettings(group_size=32))
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path, full.adapter)
    out = tmp_path / "ckpt"
    quantize(plan=plan_path, out=out, model=str(tiny_search_model_dir), calib="demo", calib_tokens=512,
             eval_tokens=256, seq_len=64, max_memory=0, progress=False)
    # the old procedure: the whole model in memory, a capture from layer 0 for every layer
    from paretoq.data import load_token_sets

    sets = load_token_sets(full.tokenizer, "demo", 512, 256, 64, 0)
    want = sequential_gptq(full.adapter, plan, sets.calib, progress=False)
    index, state = read_quantized(out)
    assert set(index["components"]) == set(plan.bits)
    for key, info in index["components"].items():
        codes = unpack(state[f"{key}.qweight"], info["bits"], info["shape"][1])
        assert torch.equal(codes, want.tensors[key].codes), key


def test_expert_chunks_cover_each_expert_once_within_the_budget(tiny_search_model_dir):
    adapter = load_model(tiny_search_model_dir).adapter
    block = adapter.moe_blocks[0]
    sizes = [sum(adapter.component(f"{block.experts_path}.{e}.{p}").shape[1] ** 2 * 4 for p in ("gate_proj", "down_proj"))
             for e in range(block.num_experts)]
    assert expert_chunks(adapter, block.layer, sum(sizes)) == [None]  # all fit: one pass
    assert expert_chunks(adapter, 0, 1) == [None]  # a dense layer has no routed experts
    for budget in (1, sizes[0], 2 * sizes[0] + 1, sum(sizes) - 1):
        chunks = expert_chunks(adapter, block.layer, budget)
        assert sorted(e for c in chunks for e in c) == list(range(block.num_experts))
        assert len(chunks) > 1 and all(len(c) == 1 or sum(sizes[e] for e in c) <= budget for c in chunks)
        if budget < 2 * min(sizes):
            assert all(len(c) == 1 for c in chunks)


def test_experts_captured_in_several_passes_give_the_same_cache_and_checkpoint(tiny_search_model_dir, tmp_path,
                                                                               monkeypatch):
    """One expert's Hessians per pass (the budget below any expert's) against one pass per layer:
    the same quant-cache codes, losses and light capture, and the same sequentially quantized checkpoint."""
    import paretoq.capture as capture_module

    calib, evals = TokenSet(_ids(128, 6, 32, 1), "c"), TokenSet(_ids(128, 5, 32, 2), "e")
    settings = QuantSettings(group_size=32)
    full = load_model(tiny_search_model_dir)
    plan = Plan({c.key: (2, 3, 4, 8)[i % 4] for i, c in enumerate(full.adapter.components)}, settings)
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path, full.adapter)
    got = {}
    for budget in (capture_module.MAX_HESSIAN_BYTES, 1):
        monkeypatch.setattr(capture_module, "MAX_HESSIAN_BYTES", budget)
        monkeypatch.setenv("PARETOQ_CACHE", str(tmp_path / f"cache{budget}"))
        sm = open_model(tiny_search_model_dir, max_memory=0)
        passes = []
        monkeypatch.setattr(capture_module, "capture_layer", _counting(capture_module.capture_layer, passes))
        prep = prepare(sm, calib, {"eval": evals}, settings, (2, 4), progress=False)
        out = tmp_path / f"ckpt{budget}"
        quantize(plan=plan_path, out=out, model=str(tiny_search_model_dir), calib="demo", calib_tokens=512,
                 eval_tokens=256, seq_len=64, max_memory=0, progress=False)
        got[budget] = prep, read_quantized(out), len(passes)
    (one, (i1, s1), n1), (many, (i2, s2), n2) = got.values()
    experts = sum(b.num_experts for b in full.adapter.moe_blocks)
    moe_layers = len(full.adapter.moe_blocks)
    assert n2 - n1 == 2 * (experts - moe_layers)  # the calibration walk's and quantize's extra passes
    for c in full.adapter.components:
        for b in (2, 4):
            assert torch.equal(one.cache.get(c.key, b).codes, many.cache.get(c.key, b).codes), (c.key, b)
            assert one.cache.loss[(c.key, b)] == many.cache.loss[(c.key, b)]
    assert one.features.to_dict() == many.features.to_dict()  # routing, usage, block samples: from the first pass
    assert i1["components"] == i2["components"] and s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def _counting(fn, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped


def test_sizes_parse():
    assert parse_size("24GB") == 24 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("0") == 0
    assert parse_size(None) is None and parse_size("1e3") == 1000


def test_a_model_that_fits_stays_resident(tiny_search_model_dir):
    sm = open_model(tiny_search_model_dir)
    assert sm.resident
    with sm.layer(0):
        pass
    assert all(p.device.type != "meta" for p in sm.layers[0].parameters())


def _one_line_error(capsys, argv) -> str:
    from paretoq.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("paretoq: error:")
    return err[0]


@pytest.fixture
def broken_copy(tiny_search_model_dir, tmp_path):
    import shutil

    path = tmp_path / "model"
    shutil.copytree(tiny_search_model_dir, path)
    return path


def test_truncated_shard_is_refused_before_any_work(broken_copy, capsys):
    shard = next(broken_copy.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    msg = _one_line_error(capsys, ["eval", "--model", str(broken_copy), "--uniform", "4"])
    assert "truncated" in msg and shard.name in msg


def test_index_naming_a_missing_shard_is_refused(broken_copy, capsys):
    import json

    from safetensors.torch import load_file, save_file

    single = broken_copy / "model.safetensors"
    state = load_file(str(single))
    names = sorted(state)
    save_file({n: state[n] for n in names[: len(names) // 2]}, str(broken_copy / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {n: "model-0000%d-of-00002.safetensors" % (1 if i < len(names) // 2 else 2)
                            for i, n in enumerate(names)}}
    (broken_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    single.unlink()
    msg = _one_line_error(capsys, ["probe", "--model", str(broken_copy)])
    assert "model-00002-of-00002.safetensors" in msg


def test_unknown_dtype_is_refused(tiny_search_model_dir, capsys):
    msg = _one_line_error(capsys, ["eval", "--model", str(tiny_search_model_dir), "--uniform", "4", "--dtype", "fp8"])
    assert "fp8" in msg and "bfloat16" in msg


def test_too_little_disk_for_the_caches_is_refused_before_the_walk(tiny_search_model_dir, capsys, monkeypatch,
                                                                   tmp_path):
    import shutil
    from collections import namedtuple

    monkeypatch.setenv("PARETOQ_CACHE", str(tmp_path / "cache"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    msg = _one_line_error(capsys, ["eval", "--model", str(tiny_search_model_dir), "--uniform", "4"])
    assert "PARETOQ_CACHE" in msg
    assert not any((tmp_path / "cache").rglob("*.safetensors"))


@pytest.mark.parametrize("kind", ["quant", "captures", "reference"])
def test_an_entry_damaged_in_place_is_detected_and_recomputed(tiny_search_model_dir, tmp_path, monkeypatch, capsys,
                                                             kind):
    monkeypatch.setenv("PARETOQ_CACHE", str(tmp_path / "cache"))
    calib, evals = TokenSet(_ids(128, 4, 32, 1), "c"), TokenSet(_ids(128, 3, 32, 2), "e")
    settings = QuantSettings(group_size=32)

    def run():
        return prepare(open_model(tiny_search_model_dir, max_memory=0), calib, {"eval": evals}, settings, (3,),
                       progress=False)

    first = run()
    victim = max((tmp_path / "cache" / kind).rglob("*.safetensors"), key=lambda f: f.stat().st_size)
    blob = bytearray(victim.read_bytes())
    blob[-3] ^= 0xFF  # same size, one tensor byte flipped
    victim.write_bytes(bytes(blob))
    if kind == "captures":  # captures are read when the features made from them are missing
        for f in (tmp_path / "cache" / "features").iterdir():
            f.unlink()
    capsys.readouterr()
    second = run()
    damaged = [line for line in capsys.readouterr().err.splitlines() if "is damaged" in line]
    assert second.walked and len(damaged) == 1 and damaged[0].startswith("paretoq: warning: "), damaged
    key = next(c.key for c in first.sm.adapter.components)
    assert torch.equal(first.cache.get(key, 3).codes, second.cache.get(key, 3).codes)
    assert second.references["eval"].nll == first.references["eval"].nll
