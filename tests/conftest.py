"""Tiny randomly initialised models of every supported architecture, built from configs (no download)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU the Triton kernels run in Triton's interpreter (it must be chosen before they are defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tests never write to the user's cache.
os.environ["PARETOQ_CACHE"] = tempfile.mkdtemp(prefix="paretoq-test-cache-")
atexit.register(shutil.rmtree, os.environ["PARETOQ_CACHE"], ignore_errors=True)  # 360 MB a run, else left in /tmp

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TINY = {
    "mixtral": dict(intermediate_size=128, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                      num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                      head_dim=16, mlp_only_layers=[0]),
    "deepseek_v3": dict(intermediate_size=128, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                        num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16,
                        q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                        num_key_value_heads=4),
    "olmoe": dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                    sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    "llama": dict(intermediate_size=128),
    "qwen2": dict(intermediate_size=128),
    "mistral": dict(intermediate_size=128),
    "qwen3": dict(intermediate_size=128, head_dim=16),
}
MOE_TYPES = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss"]
DENSE_TYPES = ["llama", "qwen2", "mistral", "qwen3"]


def tiny_config(model_type: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**COMMON, **TINY[model_type]})


def tiny_model(model_type: str, seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=dtype, experts_implementation="eager")
    return _routers_drawn(model).eval()


def _routers_drawn(model):
    """Some routers start at zero (DeepSeek-V3) and would route every token alike: give them weights."""
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() >= 2:
                p.normal_(0, 0.5)
    return model


def save_tiny_with_demo_tokenizer(path, model_type: str, **overrides):
    """A tiny ``model_type`` (seed 0) that speaks the demo's tokenizer, saved with it into ``path``,
    so paretoq's commands run on it end to end with the demo's text."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from paretoq.models import load_tokenizer
    from paretoq.models.loading import demo_dir

    tok = load_tokenizer(demo_dir())
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **TINY[model_type], "vocab_size": len(tok), **overrides})
    torch.manual_seed(0)
    model = _routers_drawn(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, experts_implementation="eager"))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(params=MOE_TYPES + DENSE_TYPES)
def model_type(request):
    return request.param


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny qwen2_moe directory with a tokenizer, as a user's model directory looks."""
    from paretoq.models import load_tokenizer
    from paretoq.models.loading import demo_dir

    path = tmp_path_factory.mktemp("tiny_qwen2_moe")
    tiny_model("qwen2_moe").save_pretrained(path)
    load_tokenizer(demo_dir()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_search_model_dir(tmp_path_factory):
    """A tiny deepseek_v3 (dense first layer, shared and routed experts) that speaks the demo's
    tokenizer, so searches, probes and evaluations run end to end in seconds."""
    return save_tiny_with_demo_tokenizer(tmp_path_factory.mktemp("tiny_search"), "deepseek_v3", num_hidden_layers=3,
                                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
