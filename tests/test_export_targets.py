import pytest

from conftest import tiny_model
from paretoq.errors import ParetoqError
from paretoq.export.targets import TARGETS, check_servable, problems, target_space, units
from paretoq.models import get_adapter
from paretoq.plan import Plan
from paretoq.space import SearchSpace, load_space, make_groups


@pytest.fixture(scope="module")
def deepseek():
    return get_adapter(tiny_model("deepseek_v3"))


@pytest.fixture(scope="module")
def qwen():
    return get_adapter(tiny_model("qwen2_moe"))


def test_units_follow_each_engines_modules(qwen, deepseek):
    vllm = units(qwen, TARGETS["vllm"])
    assert {c.proj for c in vllm["model.layers.0.self_attn.qkv_proj"]} == {"q_proj", "k_proj", "v_proj"}
    assert {c.proj for c in vllm["model.layers.1.mlp.shared_expert.gate_up_proj"]} == {"gate_proj", "up_proj"}
    assert len(vllm["model.layers.1.mlp.experts"]) == 4 * 3
    assert [c.proj for c in vllm["model.layers.1.mlp.shared_expert.down_proj"]] == ["down_proj"]
    ds = units(deepseek, TARGETS["vllm"])
    assert {c.proj for c in ds["model.layers.0.self_attn.fused_qkv_a_proj"]} == {"q_a_proj", "kv_a_proj_with_mqa"}
    assert {c.proj for c in ds["model.layers.0.mlp.gate_up_proj"]} == {"gate_proj", "up_proj"}  # dense layer
    cpp = units(qwen, TARGETS["llamacpp"])
    assert {c.expert for c in cpp["model.layers.1.mlp.experts.*.down_proj"]} == {0, 1, 2, 3}
    assert all(len(u) == 1 for n, u in cpp.items() if "experts" not in n)
    assert all(len(u) == 1 for u in units(qwen, TARGETS["gptqmodel"]).values())


def test_problems_name_the_module_and_the_fix(qwen):
    per_expert = Plan({c.key: 2 if c.expert == 0 else 4 for c in qwen.components})
    assert not problems(per_expert, qwen, TARGETS["gptqmodel"])
    with pytest.raises(ParetoqError, match=r"llama.cpp gives model\.layers\.\d\.mlp\.experts\.\*\.\w+ one width, "
                                           r"but the plan gives .* 2 bits and .* 4 bits .*pass --collapse max or "
                                           r"--collapse weighted .*or search with --target llamacpp"):
        check_servable(per_expert, qwen, TARGETS["llamacpp"])
    uniform2 = Plan({c.key: 2 for c in qwen.components})
    found = problems(uniform2, qwen, TARGETS["vllm"])
    assert found and all("vLLM serves 4/8 bits" in p for p in found)
    half_qkv = Plan({c.key: 4 for c in qwen.components if c.proj != "q_proj"})
    assert any("full precision" in p and "qkv_proj" in p for p in problems(half_qkv, qwen, TARGETS["vllm"]))


def test_target_space_ties_and_restricts(qwen, deepseek):
    space = target_space(load_space("default"), "vllm", budget=4.5)
    assert space.granularity == "layer-experts" and all(v == (4, 8) for v in space.bits.values())
    for adapter in (qwen, deepseek):
        groups = make_groups(adapter, space)
        # every plan of the space is servable: give each group a different width pattern and check
        for pick in (min, max):
            bits = {k: pick(g.choices) if i % 2 else 12 - pick(g.choices) for i, g in enumerate(groups)
                    for k in g.keys}
            assert not problems(Plan(bits), adapter, TARGETS["vllm"])
        names = {g.name for g in groups}
        assert "model.layers.0.self_attn.q_proj+k_proj+v_proj" in names or adapter is deepseek
    cpp = target_space(load_space("default"), "llamacpp")
    # llama.cpp's own types, q5_k and q6_k included, within the space's range of widths
    assert cpp.granularity == "layer-projection" and cpp.bits == {k: (2, 3, 4, 5, 6, 8) for k in cpp.bits}
    # and the token embedding and output head, which a GGUF stores like any matrix, in the same range
    assert {"embed", "head"} <= set(cpp.bits)
    narrow = target_space(SearchSpace("n", "expert", {"expert": (2, 4)}), "llamacpp")
    assert narrow.bits == {"expert": (2, 3, 4), "embed": (2, 3, 4), "head": (2, 3, 4)}
    named = target_space(SearchSpace("n", "expert", {"expert": (2, 4), "head": (6, 8)}), "llamacpp")
    assert named.bits == {"expert": (2, 3, 4), "head": (6, 8), "embed": (2, 3, 4, 5, 6, 8)}  # the space's own range
    with pytest.raises(ParetoqError, match="none of which GPTQModel serves"):
        target_space(SearchSpace("n", "expert", {"expert": (2, 4), "embed": (4,)}), "gptqmodel")
    assert target_space(load_space("layer-experts"), "llamacpp").granularity == "layer-experts"  # already coarser
    assert target_space(load_space("component"), "gptqmodel").granularity == "component"
    assert target_space(load_space("default"), None) == load_space("default")


def test_target_space_errors():
    with pytest.raises(ParetoqError, match=r"budget 3 is below the 4 bits that --target vllm needs at least; "
                                           r"pass --budget 4 or more"):
        target_space(load_space("default"), "vllm", budget=3.0)
    low = SearchSpace("low", "expert", {"expert": (2, 3)})
    with pytest.raises(ParetoqError, match=r"search space 'low' gives expert 2/3 bits, none of which vLLM serves \(4/8\)"):
        target_space(low, "vllm")
    with pytest.raises(ParetoqError, match="exllamav3 quantizes every linear layer"):
        target_space(low, "exl3")
    with pytest.raises(ParetoqError, match="unknown target 'tensorrt'; use one of gptqmodel, vllm"):
        target_space(low, "tensorrt")
