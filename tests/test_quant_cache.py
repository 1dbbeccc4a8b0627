import pytest
import torch

from conftest import tiny_model
from paretoq.capture import capture
from paretoq.data import TokenSet
from paretoq.models import get_adapter
from paretoq.quant.cache import QuantCache
from paretoq.quant.gptq import gptq
from paretoq.quant.quantizer import QuantSettings, rtn


def _setup(model_type="qwen2_moe", seed=0):
    adapter = get_adapter(tiny_model(model_type))
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(seed))
    return adapter, capture(adapter, TokenSet(ids, "t"), progress=False)


def test_hit_returns_identical_tensors_and_quantizes_nothing(tmp_path):
    adapter, cap = _setup()
    first = QuantCache(adapter, cap, "cap-a", QuantSettings(group_size=32), root=tmp_path)
    first.fill(bits=(2, 4), progress=False)
    assert first.computed == 2 * 2  # 2 layers x 2 widths
    second = QuantCache(adapter, cap, "cap-a", QuantSettings(group_size=32), root=tmp_path)
    second.fill(bits=(2, 4), progress=False)
    assert second.computed == 0
    for c in adapter.components:
        for b in (2, 4):
            a, b_ = first.get(c.key, b), second.get(c.key, b)
            assert torch.equal(a.codes, b_.codes) and torch.equal(a.scales, b_.scales) and torch.equal(a.zeros, b_.zeros)


def test_entries_are_gptq_of_the_fp_capture(tmp_path):
    adapter, cap = _setup()
    qc = QuantCache(adapter, cap, "cap-a", QuantSettings(group_size=32), root=tmp_path)
    key = "model.layers.1.mlp.experts.2.down_proj"
    ref = gptq(adapter.weight(key), cap.hessian(key), 3, QuantSettings(group_size=32))
    torch.testing.assert_close(qc.weight(key, 3), ref.q.dequantize())


def test_other_calibration_or_settings_miss(tmp_path):
    adapter, cap = _setup()
    QuantCache(adapter, cap, "cap-a", QuantSettings(group_size=32), root=tmp_path).fill(bits=(4,), progress=False)
    for key, settings in (("cap-b", QuantSettings(group_size=32)), ("cap-a", QuantSettings(group_size=-1)),
                          ("cap-a", QuantSettings(group_size=32, act_order=True))):
        other = QuantCache(adapter, cap, key, settings, root=tmp_path)
        other.fill(bits=(4,), progress=False)
        assert other.computed == 2


def test_a_corrupt_entry_is_recomputed(tmp_path):
    adapter, cap = _setup()
    qc = QuantCache(adapter, cap, "cap-a", QuantSettings(group_size=32), root=tmp_path)
    qc.fill(bits=(4,), progress=False)
    path = qc.path(1, 4)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    again = QuantCache(adapter, cap, "cap-a", QuantSettings(group_size=32), root=tmp_path)
    again.fill(bits=(4,), progress=False)
    assert again.computed == 1
    assert torch.equal(again.get("model.layers.1.self_attn.q_proj", 4).codes, qc.get("model.layers.1.self_attn.q_proj", 4).codes)


def test_experts_without_tokens_fall_back_to_rtn(tmp_path):
    adapter = get_adapter(tiny_model("gpt_oss"))
    with torch.no_grad():
        for b in adapter.moe_blocks:  # every token to experts 1 and 2: 0 and 3 see nothing
            b.router.weight.zero_()
            b.router.bias.copy_(torch.tensor([0.0, 5.0, 10.0, 1.0]))
    cap = capture(adapter, TokenSet(torch.randint(3, 128, (2, 16)), "t"), progress=False)
    qc = QuantCache(adapter, cap, "k", QuantSettings(group_size=32), root=tmp_path)
    qc.fill(bits=(4,), progress=False)
    idle = {f"model.layers.{i}.mlp.experts.{e}.{p}" for i in (0, 1) for e in (0, 3)
            for p in ("gate_proj", "up_proj", "down_proj")}
    assert qc.rtn_fallback == idle
    key = "model.layers.0.mlp.experts.3.up_proj"
    torch.testing.assert_close(qc.weight(key, 4), rtn(adapter.weight(key), 4, 32).dequantize())


@pytest.mark.parametrize("act_order", [False, True])
def test_one_hessian_factor_serves_every_reader_and_width(act_order):
    """Sharing each input's factor across gate/up, q/k/v and widths changes no code: every component
    equals its own GPTQ from its own Hessian; and the Hessians are dropped once factored."""
    from paretoq.quant.apply import quantize_components

    adapter, cap = _setup()
    settings = QuantSettings(group_size=32, act_order=act_order)
    keys = [c.key for c in adapter.components if c.layer == 1]
    mixed = {k: (2, 3, 4)[i % 3] for i, k in enumerate(keys)}  # a plan's mixed widths, as quantize passes them
    alone = {(k, b): gptq(adapter.weight(k), cap.hessian(k), b, settings).q
             for k in keys for b in {mixed[k], 2, 4}}

    def same(got, b_of):
        for k in keys:
            ref = alone[(k, b_of(k))]
            assert torch.equal(got.tensors[k].codes, ref.codes) and torch.equal(got.tensors[k].scales, ref.scales), k

    same(quantize_components(adapter, cap, mixed, settings), mixed.get)
    factors, sites = {}, {cap.site[k] for k in keys}
    for b in (2, 4):  # the calibration walk: one call per width, one factor per input
        same(quantize_components(adapter, cap, dict.fromkeys(keys, b), settings, factors), lambda k: b)
        assert sites <= set(factors) and not sites & set(cap.hessians)
