"""Write a random-initialised MoE checkpoint one decoder layer at a time (never the whole model in memory).

    python studies/scale/make_model.py --out /tmp/q3-like --layers 8 --hidden 2048 --experts 128 \
        --expert-size 768 --top-k 8 --dtype bfloat16

The model is a `qwen3_moe` with the given layer shape, saved as Hugging Face saves it (per-expert
tensors, one safetensors shard per layer plus one for embeddings and head, an index), with the demo's
tokenizer, so that every paretoq command takes it as a user's model directory. Weights are N(0, 0.02)
(routers N(0, 1) so tokens spread over the experts), norms 1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def make_model(out: Path, layers: int, hidden: int, experts: int, expert_size: int, top_k: int, heads: int = 16,
               kv_heads: int = 4, head_dim: int = 128, vocab: int | None = None, dtype: str = "bfloat16",
               seed: int = 0) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from paretoq.models import get_adapter, load_tokenizer
    from paretoq.models.loading import demo_dir

    tok = load_tokenizer(demo_dir())
    cfg = AutoConfig.for_model(
        "qwen3_moe", hidden_size=hidden, intermediate_size=4 * hidden, moe_intermediate_size=expert_size,
        num_experts=experts, num_experts_per_tok=top_k, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab or len(tok), bos_token_id=0,
        eos_token_id=0, pad_token_id=0, dtype=dtype, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, experts_implementation="eager")
    adapter = get_adapter(model)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)

    def rand(shape, std=0.02):
        return (torch.randn(shape, generator=g) * std).to(dt)

    weight_map: dict[str, str] = {}
    pieces = layers + 1

    def write(i: int, tensors: dict[str, torch.Tensor]) -> None:
        name = f"model-{i + 1:05d}-of-{pieces:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    for i, layer in enumerate(adapter.layers):
        tensors: dict[str, torch.Tensor] = {}
        base = f"{adapter.layers_prefix}.{i}"
        for name, p in layer.named_parameters():
            if "experts." in name and name.rsplit(".", 1)[-1] in ("gate_up_proj", "down_proj"):
                continue  # stored one expert at a time below, as checkpoints are
            std = 1.0 if name.endswith("gate.weight") else 0.02
            tensors[f"{base}.{name}"] = torch.ones(p.shape, dtype=dt) if "norm" in name else rand(p.shape, std)
        for c in adapter.components:
            if c.layer == i and c.kind == "expert":
                tensors[f"{c.key}.weight"] = rand(c.shape)
        write(i, tensors)
    write(layers, {"model.embed_tokens.weight": rand((cfg.vocab_size, hidden)),
                   "model.norm.weight": torch.ones(hidden, dtype=dt),
                   "lm_head.weight": rand((cfg.vocab_size, hidden))})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--expert-size", type=int, default=768)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary rows (default: the demo tokenizer's); "
                    "a real model's (151936 for Qwen3) sizes the embedding and head as in the real model")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    make_model(a.out, a.layers, a.hidden, a.experts, a.expert_size, a.top_k, a.heads, a.kv_heads, a.head_dim,
               vocab=a.vocab, dtype=a.dtype)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
