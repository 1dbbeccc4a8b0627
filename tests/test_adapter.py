import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import MOE_TYPES, tiny_model
from paretoq.errors import ParetoqError
from paretoq.models import get_adapter

# Weights of attention, MLP and expert projections, found by name only (independent of the adapter):
# every >= 2-D parameter under `self_attn` or `mlp`, less biases (GPT-OSS's expert biases are 2-D),
# the routers and qwen2_moe's shared-expert gate.
_ROUTER = re.compile(r"mlp\.(gate|router|shared_expert_gate)\.weight$")


def _projection_weights(model):
    return {
        n: p for n, p in model.named_parameters()
        if re.search(r"\.(self_attn|mlp)\.", n) and p.dim() >= 2 and not n.endswith("bias") and not _ROUTER.search(n)
    }


def _tokens(model, n=4, seq=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (n, seq), generator=g)


def test_component_params_add_up_exactly(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    expected = sum(p.numel() for p in _projection_weights(model).values())
    assert sum(c.params for c in adapter.components) == expected
    assert sum(adapter.params_by_kind().values()) == expected


def test_keys_are_unique_and_kinds_match_the_architecture(model_type):
    adapter = get_adapter(tiny_model(model_type))
    keys = [c.key for c in adapter.components]
    assert len(keys) == len(set(keys))
    kinds = {c.kind for c in adapter.components}
    expected = {
        "mixtral": {"attn", "expert"}, "olmoe": {"attn", "expert"}, "gpt_oss": {"attn", "expert"},
        "qwen2_moe": {"attn", "shared", "expert"},
        "qwen3_moe": {"attn", "dense", "expert"},  # mlp_only_layers=[0]
        "deepseek_v3": {"attn", "dense", "shared", "expert"},  # first_k_dense_replace=1
        "llama": {"attn", "dense"}, "qwen2": {"attn", "dense"}, "mistral": {"attn", "dense"}, "qwen3": {"attn", "dense"},
    }[model_type]
    assert kinds == expected
    for c in adapter.components:
        assert (c.expert is not None) == (c.kind == "expert")
        assert c.key.startswith(f"model.layers.{c.layer}.")
        if c.kind == "expert":
            assert c.key.endswith(f".experts.{c.expert}.{c.proj}")


def test_write_changes_exactly_that_slice_and_reads_back(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    ids = _tokens(model, n=8, seq=32)  # 256 tokens: every expert of a 4-expert top-2 layer is routed to
    params = dict(model.named_parameters())
    with torch.no_grad():
        base = model(ids).logits
    g = torch.Generator().manual_seed(2)
    for c in adapter.components:
        before = {n: p.detach().clone() for n, p in params.items()}
        W = torch.randn(c.shape, generator=g) + 3.0  # far from any initialised weight
        adapter.set_weight(c, W)
        assert torch.equal(adapter.weight(c), W), c.key
        changed = {n: (params[n] != before[n]).sum().item() for n in params}
        assert sum(changed.values()) == c.params, c.key  # exactly the slice's elements, no more
        assert sum(1 for v in changed.values() if v) == 1, c.key  # all in one tensor
        with torch.no_grad():
            assert not torch.allclose(model(ids).logits, base), c.key
            for n, p in params.items():
                p.copy_(before[n])


def test_expert_views_reproduce_the_experts_forward():
    """The adapter's [out, in] views, used as plain matrices, give what the model's experts compute."""
    for model_type in MOE_TYPES:
        model = tiny_model(model_type)
        adapter = get_adapter(model)
        cfg = model.config
        x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
        for block in adapter.moe_blocks:
            for e in range(block.num_experts):
                key = f"{block.experts_path}.{e}"
                W = {p: adapter.weight(f"{key}.{p}") for p in ("gate_proj", "up_proj", "down_proj")}
                b = {p: adapter.bias(f"{key}.{p}") for p in W}
                gate = F.linear(x, W["gate_proj"], b["gate_proj"])
                up = F.linear(x, W["up_proj"], b["up_proj"])
                if model_type == "gpt_oss":  # GPT-OSS's clamped SwiGLU (modeling_gpt_oss)
                    gate = gate.clamp(max=cfg.swiglu_limit)
                    up = up.clamp(-cfg.swiglu_limit, cfg.swiglu_limit)
                    h = (up + 1) * gate * torch.sigmoid(gate * cfg.swiglu_alpha)
                else:
                    h = F.silu(gate) * up
                expected = F.linear(h, W["down_proj"], b["down_proj"])
                index = torch.full((5, 1), e)
                weights = torch.ones(5, 1)
                with torch.no_grad():
                    got = block.experts(x, index, weights)
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{model_type} {key}")


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe"])
def test_keys_are_the_checkpoint_names(model_type, tmp_path):
    """save_pretrained writes experts per expert (defused): every key's tensor is saved under its key."""
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    mixtral = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
    for c in adapter.components:
        name = f"{c.key}.weight"
        if model_type == "mixtral" and c.kind == "expert":
            name = name.replace(".mlp.", ".block_sparse_moe.").replace(c.proj, mixtral[c.proj])
        assert torch.equal(saved[name], adapter.weight(c)), name


def test_moe_blocks_and_shared_experts():
    adapter = get_adapter(tiny_model("deepseek_v3"))
    assert [b.layer for b in adapter.moe_blocks] == [1]
    block = adapter.moe_blocks[0]
    assert (block.num_experts, block.top_k) == (4, 2)
    assert block.shared == ("model.layers.1.mlp.shared_experts",)
    attn = {c.proj for c in adapter.components if c.kind == "attn" and c.layer == 1}
    assert attn == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    assert get_adapter(tiny_model("gpt_oss")).moe_blocks[0].router.__class__.__name__ == "GptOssTopKRouter"


def test_unsupported_model_type_names_it_and_the_supported_list():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt2", vocab_size=64, n_embd=32, n_layer=1, n_head=2)
    with pytest.raises(ParetoqError, match=r"model_type 'gpt2' is not supported; supported: .*deepseek_v3"):
        get_adapter(AutoModelForCausalLM.from_config(cfg))


def test_unknown_key_and_wrong_shape_are_refused():
    adapter = get_adapter(tiny_model("olmoe"))
    with pytest.raises(ParetoqError, match="no component"):
        adapter.weight("model.layers.0.mlp.experts.99.gate_proj")
    c = adapter.components[0]
    with pytest.raises(ValueError, match="shape"):
        adapter.set_weight(c, torch.zeros(c.shape[1] + 1, c.shape[0]))
