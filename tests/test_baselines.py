import pytest
import torch

from conftest import tiny_model
from paretoq import baselines as bl
from paretoq.capture import capture
from paretoq.data import TokenSet
from paretoq.models import get_adapter
from paretoq.plan import Plan
from paretoq.probes.features import compute_features
from paretoq.space import load_space, make_groups

# Heuristics with a free k or percentage are matched to the budget; the rest are fixed plans.
MATCHED = ("+Attn+Shared+Freq", "+Attn+Shared+FirstL", "LinearOSP", "LayerISP", "MoEPTQ-R/0", "MoEPTQ-R/1",
           "MoEPTQ-R/2", "knapsack")


@pytest.fixture(scope="module")
def setup():
    adapter = get_adapter(tiny_model("deepseek_v3"))
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    features = compute_features(adapter, capture(adapter, TokenSet(ids, "t"), progress=False))
    groups = make_groups(adapter, load_space("default"))
    # a made-up sensitivity: halves per extra bit, larger for bigger groups
    sens = {g.name: {b: g.params * 2.0 ** -b for b in g.choices} for g in groups}
    return adapter, features, groups, sens


@pytest.mark.parametrize("budget", [2.5, 3.0, 4.0])
def test_every_matched_baseline_respects_its_budget(setup, budget):
    adapter, features, groups, sens = setup
    plans = bl.heuristics(groups, features, budget)
    plans["knapsack"] = bl.knapsack(groups, sens, budget)
    base = bl._attn(groups, shared=True)
    for name in MATCHED:
        # within the budget, unless even k = 0 (the heuristic's base) exceeds it: then it is infeasible
        assert bl.avg_bits(groups, plans[name]) <= budget + 1e-9 or (name != "knapsack" and plans[name] == base), name
    assert bl.avg_bits(groups, plans["MoQE"]) <= budget + 1e-9 or all(
        plans["MoQE"][g.name] == 2 for g in groups if g.kind == "expert")
    for name, bits in plans.items():  # group averages agree with the plan's own arithmetic
        comp = {k: bits[g.name] for g in groups for k in g.keys}
        assert Plan(comp).avg_bits(adapter) == pytest.approx(bl.avg_bits(groups, bits)), name


def test_freq_upgrades_the_most_used_experts_first(setup):
    _, features, groups, _ = setup
    experts = [g for g in groups if g.kind == "expert"]
    base = bl._attn(groups, shared=True)
    budget = bl.avg_bits(groups, base) + experts[0].params * 2 / sum(g.params for g in groups) + 1e-9  # one expert
    bits = bl.heuristics(groups, features, budget)["+Attn+Shared+Freq"]
    up = [g for g in experts if bits[g.name] == 4]
    assert len(up) == 1
    usage = {g.name: max(features.by_key()[k].usage for k in g.keys) for g in experts if g.layer == up[0].layer}
    assert usage[up[0].name] == max(usage.values())


def test_knapsack_spends_the_budget_where_kl_falls_most(setup):
    adapter, features, groups, _ = setup
    target = next(g for g in groups if g.kind == "expert")
    sens = {g.name: {b: (1.0 if g is target else 1e-6) * 2.0 ** -b for b in g.choices} for g in groups}
    bits = bl.knapsack(groups, sens, budget=2.0 + 1e-9 + 6 * target.params / sum(g.params for g in groups))
    assert bits[target.name] == 8 and all(bits[g.name] == 2 for g in groups if g is not target)
