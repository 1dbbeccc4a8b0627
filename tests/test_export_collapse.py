import pytest

from conftest import tiny_model
from paretoq.errors import ParetoqError
from paretoq.export.collapse import collapse
from paretoq.export.targets import TARGETS, problems, units
from paretoq.models import get_adapter
from paretoq.plan import Plan


@pytest.fixture(scope="module")
def adapter():
    return get_adapter(tiny_model("qwen2_moe"))


def per_expert_plan(adapter):
    """Routed experts at 2 bits except expert 0 at 8; everything else at 4."""
    return Plan({c.key: (8 if c.expert == 0 else 2) if c.kind == "expert" else 4 for c in adapter.components})


@pytest.mark.parametrize("target", ["llamacpp", "vllm", "exl3"])
def test_collapse_makes_the_plan_servable(adapter, target):
    plan = per_expert_plan(adapter)
    t = TARGETS[target]
    assert problems(plan, adapter, t)
    for mode in ("max", "weighted"):
        c = collapse(plan, adapter, t, mode)
        assert not problems(c.plan, adapter, t)
        assert c.avg_bits_before == pytest.approx(plan.avg_bits(adapter))
        assert c.avg_bits_after == pytest.approx(c.plan.avg_bits(adapter))
        assert c.changed > 0 and f"{c.avg_bits_before:.3f} -> {c.avg_bits_after:.3f}" in c.summary()


def test_max_never_lowers_a_width_and_weighted_keeps_the_mean_close(adapter):
    plan = per_expert_plan(adapter)
    t = TARGETS["llamacpp"]
    hi = collapse(plan, adapter, t, "max").plan
    assert all(hi.bits[k] >= b for k, b in plan.bits.items())
    assert {hi.bits[k] for k in plan.bits if ".experts." in k} == {8}
    near = collapse(plan, adapter, t, "weighted").plan
    # 4 experts of equal size at 8, 2, 2, 2: mean 3.5 -> 4 (ties go to the wider), not 8
    assert {near.bits[k] for k in plan.bits if ".experts." in k} == {4}
    for name, comps in units(adapter, t).items():
        assert len({near.bits[c.key] for c in comps}) == 1


def test_bits_the_engine_lacks_round_to_served_ones(adapter):
    plan = Plan({c.key: 2 for c in adapter.components})
    assert set(collapse(plan, adapter, TARGETS["vllm"], "max").plan.bits.values()) == {4}
    assert set(collapse(plan, adapter, TARGETS["vllm"], "weighted").plan.bits.values()) == {4}


def test_full_precision_counts_as_16_bits(adapter):
    # q_proj kept in full precision, k/v at 4: vLLM loads one qkv_proj
    plan = Plan({c.key: 4 for c in adapter.components if c.proj != "q_proj"})
    t = TARGETS["vllm"]
    hi = collapse(plan, adapter, t, "max").plan
    assert not any(".self_attn.q_proj" in k or ".self_attn.k_proj" in k for k in hi.bits)  # whole qkv in fp
    near = collapse(plan, adapter, t, "weighted").plan
    assert {near.bits[k] for k in near.bits if ".self_attn." in k and "o_proj" not in k} == {8}
    assert not problems(near, adapter, t) and not problems(hi, adapter, t)
    exl3 = collapse(plan, adapter, TARGETS["exl3"], "max").plan  # exllamav3 keeps nothing in fp
    assert len(exl3.bits) == len(adapter.components)


def test_unknown_mode(adapter):
    with pytest.raises(ParetoqError, match="unknown --collapse 'min'; use one of max, weighted"):
        collapse(per_expert_plan(adapter), adapter, TARGETS["llamacpp"], "min")
