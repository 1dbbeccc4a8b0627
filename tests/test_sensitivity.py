import pytest

from paretoq.probes.sensitivity import evaluations, measure_sensitivity, resolve_method, units
from paretoq.space import Group


def _groups():
    gs = [Group(f"model.layers.{layer}.mlp.experts.{e}", "expert", layer, (f"L{layer}e{e}.gate", f"L{layer}e{e}.up"),
                100, (2, 3, 4, 8)) for layer in (1, 2) for e in range(6)]
    gs += [Group(f"model.layers.{layer}.self_attn.q_proj", "attn", layer, (f"L{layer}q",), 50, (2, 4))
           for layer in (1, 2)]
    return gs


def test_unit_method_costs_layers_x_kinds_x_widths_and_shares_each_measurement_by_gptq_error():
    groups = _groups()
    loss = {(k, b): (1 + i) * 2.0 ** -b for i, g in enumerate(groups) for k in g.keys for b in g.choices}
    usage = {g.name: 0.5 if g.kind == "expert" else 1.0 for g in groups}
    calls = []

    def measure(bits):  # a unit's KL: the number of its components, halving per bit
        calls.append(bits)
        return len(bits) * 2.0 ** -min(bits.values())

    sens = measure_sensitivity(measure, groups, "unit", loss=loss, usage=usage)
    assert len(calls) == evaluations(groups, "unit") == 2 * 4 + 2 * 2  # not 12 * 4 + 2 * 2
    assert evaluations(groups, "group") == 12 * 4 + 2 * 2
    for (layer, kind), members in units(groups).items():
        for b in members[0].choices:
            # summed over a unit at one width, the shares give back the unit's measured KL
            assert sum(sens[g.name][b] for g in members) == pytest.approx(2 * len(members) * 2.0 ** -b
                                                                           if kind == "expert" else 2.0 ** -b)
            errs = [sum(loss[(k, b)] for k in g.keys) for g in members]  # in proportion to the GPTQ error
            assert [sens[g.name][b] / sens[members[0].name][b] for g in members] == pytest.approx(
                [e / errs[0] for e in errs])


def test_group_method_measures_each_group_alone():
    groups = _groups()[:3]
    seen = []
    sens = measure_sensitivity(lambda bits: seen.append(bits) or 0.1, groups, "group")
    assert len(seen) == 12 and all(len(b) == 2 for b in seen) and sens[groups[0].name] == {2: 0.1, 3: 0.1, 4: 0.1, 8: 0.1}


def test_lowest_method_measures_each_group_once_and_scales_by_gptq_error():
    groups = _groups()
    loss = {(k, b): (1 + i) * 2.0 ** -b for i, g in enumerate(groups) for k in g.keys for b in g.choices}
    loss.pop((groups[-1].keys[0], 4))  # a component rounded to nearest at 4 bits: no GPTQ error there
    calls = []

    def measure(bits):  # a group's KL: its index times 3, halving per bit
        calls.append(bits)
        i = next(i for i, g in enumerate(groups) if set(g.keys) == set(bits))
        return 3.0 * (1 + i) * 2.0 ** -min(bits.values())

    sens = measure_sensitivity(measure, groups, "lowest", loss=loss)
    assert len(calls) == evaluations(groups, "lowest") == len(groups)  # one evaluation per group
    assert all(set(b.values()) == {min(g.choices)} for b, g in zip(calls, groups))  # at its lowest width
    for i, g in enumerate(groups[:-1]):
        at_lowest = 3.0 * (1 + i) * 2.0 ** -min(g.choices)
        assert sens[g.name] == pytest.approx({b: at_lowest * 2.0 ** (min(g.choices) - b) for b in g.choices})
    last = groups[-1]
    assert sens[last.name][4] == pytest.approx(sens[last.name][2] / 16)  # no error: 4x less per added bit


def test_auto_is_lowest_when_it_costs_no_more_than_the_trials():
    groups = _groups()  # 14 groups
    assert resolve_method("auto", groups, trials=14) == "lowest"
    assert resolve_method("auto", groups, trials=13) == "unit"
    assert resolve_method("group", groups, trials=1000) == "group"
