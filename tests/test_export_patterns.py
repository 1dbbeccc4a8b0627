import random
import re

from paretoq.export.patterns import layer_rules, names_regex


def universe(seed):
    rng = random.Random(seed)
    names = []
    for layer in range(12):
        names += [f"model.layers.{layer}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")]
        names += [f"model.layers.{layer}.mlp.{p}" for p in ("gate", "gate_proj", "gate_up_proj", "experts")]
        names += [f"model.layers.{layer}.mlp.experts.{e}.{p}" for e in range(12) for p in ("gate_proj", "up_proj", "w1")]
    names += ["lm_head", "model.norm"]
    rng.shuffle(names)
    return names


def test_rules_match_exactly_their_names():
    for seed in range(20):
        names = universe(seed)
        rng = random.Random(seed)
        chosen = set(rng.sample(names, rng.randrange(1, len(names))))
        rules = layer_rules(chosen, "model.layers")
        one = names_regex(chosen)
        for name in names + [n + "_x" for n in names] + ["x." + n for n in names]:
            hits = [r for r in rules if re.match(r, name)]
            assert len(hits) == (name in chosen), name  # one rule per name, no rule for the rest
            assert bool(re.search(one, name)) == (name in chosen), name  # anchored, so search == fullmatch


def test_alike_layers_share_one_rule():
    names = [f"model.layers.{i}.mlp.experts.{e}.{p}" for i in (1, 2, 5) for e in range(64)
             for p in ("gate_proj", "up_proj", "down_proj")]
    assert layer_rules(names, "model.layers") == [
        r"^model\.layers\.(?:1|2|5)\.mlp\.experts\.(?:" + "|".join(map(str, range(64)))
        + r")\.(?:down_proj|gate_proj|up_proj)$"]
