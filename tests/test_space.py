import pytest

from conftest import tiny_model
from paretoq.errors import ParetoqError
from paretoq.models import get_adapter
from paretoq.space import load_space, make_groups, restrict_bits


@pytest.fixture(scope="module")
def adapter():
    return get_adapter(tiny_model("qwen2_moe"))


def test_granularities_tie_the_right_components(adapter):
    def groups(name):
        return make_groups(adapter, load_space(name))

    n_comp = len(adapter.components)
    assert len(groups("component")) == n_comp
    expert = groups("default")
    for g in expert:
        if g.kind == "expert":
            assert len(g.keys) == 3 and len({k.rsplit(".", 1)[0] for k in g.keys}) == 1
        if g.kind == "shared":
            assert {k.rsplit(".", 1)[1] for k in g.keys} == {"gate_proj", "up_proj", "down_proj"}
        if g.kind == "attn":
            assert len(g.keys) == 1
    layer = [g for g in groups("layer-experts") if g.kind == "expert"]
    assert len(layer) == 2 and all(len(g.keys) == 4 * 3 for g in layer)
    proj = [g for g in groups("layer-projection") if g.kind == "expert"]
    assert len(proj) == 2 * 3 and all(len({k.rsplit(".", 1)[1] for k in g.keys}) == 1 for g in proj)
    for name in ("component", "default", "layer-experts", "layer-projection"):
        gs = groups(name)  # every component in exactly one group
        assert sorted(k for g in gs for k in g.keys) == sorted(c.key for c in adapter.components)
        for g in gs:
            assert g.params == sum(adapter.component(k).params for k in g.keys)


def test_bad_spaces(tmp_path):
    with pytest.raises(ParetoqError, match="unknown search space 'nope'; pass one of"):
        load_space("nope")
    cases = {
        "a.yaml": ("granularity: layer\nbits: {expert: [2, 4]}\n", "granularity 'layer'"),
        "b.yaml": ("granularity: expert\nbits: {expert: [5]}\n", "must be a non-empty list"),
        "c.yaml": ("granularity: expert\nbits: {router: [4]}\n", "kind 'router'"),
        "d.yaml": ("bits: [unclosed\n", "not valid YAML"),
        "e.yaml": ("- 1\n", "must be a mapping"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ParetoqError, match=message):
            load_space(str(tmp_path / name))


def test_restricting_bits():
    space = restrict_bits(load_space("default"), (2, 4))
    assert all(v == (2, 4) for v in space.bits.values())
    with pytest.raises(ParetoqError, match="leaves no choice"):
        restrict_bits(space, (3,))


def test_tie_key_is_read_and_ties_projections(adapter, tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("granularity: expert\nbits: {attn: [2, 4], expert: [2, 4]}\ntie: [[q_proj, k_proj, v_proj]]\n")
    space = load_space(str(path))
    assert space.tie == (("q_proj", "k_proj", "v_proj"),)
    attn = [g for g in make_groups(adapter, space) if g.kind == "attn"]
    assert sorted(len(g.keys) for g in attn) == [1, 1, 3, 3]  # per layer: q+k+v together, o alone
    for bad in ("tie: [q_proj]\n", "tie: [[q_proj]]\n", "tie: [[q_proj, k_proj], [k_proj, v_proj]]\n"):
        path.write_text("bits: {attn: [2, 4]}\n" + bad)
        with pytest.raises(ParetoqError, match="tie"):
            load_space(str(path))
