import torch

from conftest import tiny_model
from paretoq.capture import capture
from paretoq.data import TokenSet
from paretoq.models import get_adapter
from paretoq.probes.usage import expert_usage


def test_usage_equals_a_hand_count_under_known_routing():
    """GPT-OSS's router has a bias: zero its weights and every token goes to the two highest biases."""
    model = tiny_model("gpt_oss")
    adapter = get_adapter(model)
    with torch.no_grad():
        for b in adapter.moe_blocks:
            b.router.weight.zero_()
            b.router.bias.copy_(torch.tensor([0.0, 5.0, 10.0, 1.0]))
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(0))
    cap = capture(adapter, TokenSet(ids, "test"), progress=False)
    T = ids.numel()
    for b in adapter.moe_blocks:
        counts = torch.bincount(cap.routing[b.layer].top_k_index.flatten(), minlength=4)
        assert counts.tolist() == [0, T, T, 0]
        assert expert_usage(cap.routing[b.layer].top_k_index, 4).tolist() == [0.0, 0.5, 0.5, 0.0]
        assert cap.tokens[f"{b.experts_path}.2.down_proj"] == T and cap.tokens[f"{b.experts_path}.0.up_proj"] == 0


def test_usage_counts_token_dependent_routing_by_hand():
    """DeepSeek-V3 routing recomputed by the test from the router's own inputs and weights."""
    model = tiny_model("deepseek_v3")
    adapter = get_adapter(model)
    block = adapter.moe_blocks[0]
    inputs = []
    h = block.router.register_forward_hook(lambda m, args, out: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    cap = capture(adapter, TokenSet(ids, "test"), progress=False)
    h.remove()
    x = torch.cat(inputs)
    scores = (x @ block.router.weight.T).sigmoid() + block.router.e_score_correction_bias
    hand = torch.zeros(4)
    for row in scores.topk(2, dim=-1).indices:  # one token at a time, by hand
        for e in row:
            hand[e] += 1
    torch.testing.assert_close(expert_usage(cap.routing[block.layer].top_k_index, 4), (hand / hand.sum()).double())
