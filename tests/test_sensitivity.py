import pytest

from paretoq.probes.sensitivity import evaluations, measure_sensitivity, units
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
