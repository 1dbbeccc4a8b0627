import json

import pytest

from conftest import tiny_model
from paretoq.errors import ParetoqError
from paretoq.models import get_adapter
from paretoq.plan import PLAN_FORMAT, Plan, check_budget, fp_bits
from paretoq.quant.quantizer import QuantSettings


@pytest.fixture(scope="module")
def adapter():
    return get_adapter(tiny_model("qwen2_moe"))


def test_budget_arithmetic_by_hand(adapter):
    # qwen2_moe tiny: q_proj [64, 64] and an expert's down_proj [64, 32]
    q, down = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.experts.1.down_proj"
    plan = Plan({q: 8, down: 2}, QuantSettings(group_size=32))
    assert plan.avg_bits(adapter, over="plan") == (4096 * 8 + 2048 * 2) / 6144
    # packed codes + fp16 scale and zero per row and group of 32 columns
    expected = (64 * 64 * 8 // 8 + 64 * 2 * 4) + (64 * 32 * 2 // 8 + 64 * 1 * 4)
    assert plan.size_bytes(adapter) == expected
    assert plan.effective_bits(adapter, over="plan") == 8 * expected / 6144
    # over the model (the default): every other component at the model's own width
    total = sum(c.params for c in adapter.components)
    fp = fp_bits(adapter)
    assert plan.avg_bits(adapter) == pytest.approx((4096 * 8 + 2048 * 2 + (total - 6144) * fp) / total)
    assert plan.effective_bits(adapter) == pytest.approx((8 * expected + (total - 6144) * fp) / total)


def test_a_plan_missing_components_is_not_averaged_over_its_own_keys(adapter):
    """issue 19: {} reported 0.000 bits and a plan missing one component 3.000."""
    fp = fp_bits(adapter)
    assert Plan({}).avg_bits(adapter) == fp
    everything = Plan.uniform(adapter, 3)
    assert everything.avg_bits(adapter) == pytest.approx(3.0)
    missing_one = Plan(dict(list(everything.bits.items())[1:]))
    assert 3.0 < missing_one.avg_bits(adapter) < fp


def test_minimal_plan_file_is_valid(tmp_path, adapter):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": PLAN_FORMAT, "bits": {"model.layers.1.self_attn.o_proj": 3}}))
    plan = Plan.load(path)
    assert plan.quant == QuantSettings() and plan.budget is None
    assert plan.avg_bits(adapter, over="plan") == 3.0
    plan.save(tmp_path / "again.json", adapter)
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["avg_bits"] == plan.avg_bits(adapter) and again["format"] == PLAN_FORMAT and Plan.load(tmp_path / "again.json").bits == plan.bits


@pytest.mark.parametrize("content, message", [
    ("{nope", "is not JSON"),
    (json.dumps({"format": "other/1", "bits": {}}), "has format 'other/1'"),
    (json.dumps({"format": PLAN_FORMAT}), "no \"bits\""),
    (json.dumps({"format": PLAN_FORMAT, "bits": {"k": 5}}), "one of 2, 3, 4, 8"),
    (json.dumps({"format": PLAN_FORMAT, "bits": {"k": "4"}}), "one of 2, 3, 4, 8"),
    (json.dumps({"format": PLAN_FORMAT, "bits": {}, "quant": {"method": "awq"}}), "pass one of gptq, ggml"),
    (json.dumps({"format": PLAN_FORMAT, "bits": {}, "quant": [128]}), "\"quant\" of type list"),
    (json.dumps({"format": PLAN_FORMAT, "bits": {}, "quant": {"group_size": "abc"}}), "group_size 'abc'"),
    (json.dumps({"format": PLAN_FORMAT, "bits": {}, "quant": {"group_size": 0}}), "group_size 0"),
    (json.dumps({"format": PLAN_FORMAT, "bits": {}, "quant": {"damp": "x"}}), "damp 'x'"),
    (json.dumps({"format": PLAN_FORMAT, "bits": {}, "quant": {"damp": -1}}), "damp -1"),
    (json.dumps({"format": PLAN_FORMAT, "bits": {}, "quant": {"sym": "false"}}), "sym 'false'"),
    (json.dumps({"format": PLAN_FORMAT, "bits": {}, "model": "demo"}), "malformed \"model\""),
])
def test_bad_plan_files(tmp_path, content, message):
    (tmp_path / "p.json").write_text(content)
    with pytest.raises(ParetoqError, match=message):
        Plan.load(tmp_path / "p.json")


def test_keys_and_groups_checked_against_the_model(adapter):
    with pytest.raises(ParetoqError, match="does not have"):
        Plan({"model.layers.9.self_attn.q_proj": 4}).validate(adapter)
    with pytest.raises(ParetoqError, match="does not divide the input width 32"):
        Plan({"model.layers.0.mlp.experts.0.down_proj": 4}, QuantSettings(group_size=24)).validate(adapter)
    with pytest.raises(ParetoqError, match="does not exist"):
        Plan.load("/nonexistent/plan.json")
    with pytest.raises(ParetoqError, match="is for a 'mixtral' model but the model is 'qwen2_moe'"):
        Plan({}, model={"model_type": "mixtral"}).validate(adapter)


@pytest.mark.parametrize("budget", [1.5, 8.5, float("nan")])
def test_budget_outside_the_choices(budget):
    with pytest.raises(ParetoqError, match="pass --budget between 2 and 8"):
        check_budget(budget)
