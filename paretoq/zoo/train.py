"""Train the bundled demo MoE: a small DeepSeek-V3-layout model over the Python standard library.

``paretoq zoo train --out DIR`` reproduces the shipped weights (seeded; the stdlib read is the local
Python's, see corpus.py). The layout is DeepSeek-V3 so that the demo shows every component kind
(MLA attention, a dense first layer, a shared expert, routed experts) and converts to every export
target, llama.cpp's ``deepseek2`` included. Every component's input dimension is 256 so llama.cpp's
256-wide K-quants apply and GPTQ groups of 128 divide it.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from paretoq.cache import atomic_directory
from paretoq.data import token_stream
from paretoq.zoo import corpus

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 1000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Switch-Transformer balance-loss weight (Fedus et al. 2021 use 0.01). transformers' DeepSeek-V3
    # computes no auxiliary loss, and without one the routers collapse onto a few experts.
    balance_coef: float = 0.01


def demo_model_config(vocab_size: int):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,  # the dense first layer
        moe_intermediate_size=256,
        num_hidden_layers=5,
        first_k_dense_replace=1,  # layer 0 dense, layers 1-4 MoE
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        # transformers routes DeepSeek-V3 with sigmoid scores whatever the config says; llama.cpp's
        # converter writes the gating function only from this key, and without it llama.cpp's
        # deepseek2 routes with softmax (another model: its perplexity on the demo was 3.6% higher).
        scoring_func="sigmoid",
        topk_method="noaux_tc",
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=256,  # llama.cpp cannot quantize a deepseek2 GGUF without q_lora_rank
        kv_lora_rank=256,
        qk_rope_head_dim=32,
        qk_nope_head_dim=32,
        v_head_dim=64,  # o_proj input = 4 heads x 64 = 256
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style), wrapped as a standard HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss, E * sum_e f_e * P_e, averaged over MoE layers.

    DeepSeek-V3 routes on sigmoid scores, so P_e is the mean of the scores normalised per token
    (as in DeepSeek-V3's sequence-wise balance loss) and f_e the share of top-k slots expert e gets.
    """
    losses = []
    for logits in router_logits:
        scores = logits.float().sigmoid()
        num_experts = scores.shape[-1]
        chosen = scores.topk(top_k, dim=-1).indices
        f = torch.zeros(num_experts, device=logits.device).scatter_add_(
            0, chosen.flatten(), torch.ones(chosen.numel(), device=logits.device)
        ) / chosen.numel()
        P = (scores / scores.sum(-1, keepdim=True)).mean(0)
        losses.append(num_experts * (f * P).sum())
    return torch.stack(losses).mean()


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def heldout_metrics(model, stream: torch.Tensor, seq_len: int, batch_size: int = 8) -> dict:
    """Perplexity over non-overlapping windows of the held-out stream, and expert usage per MoE layer."""
    model.eval()
    n = (stream.numel() - 1) // seq_len
    windows = stream[: n * seq_len].view(n, seq_len)
    nll, count = 0.0, 0
    usage: list[torch.Tensor] | None = None
    top_k = model.config.num_experts_per_tok
    for i in range(0, n, batch_size):
        ids = windows[i : i + batch_size]
        out = model(ids, output_router_logits=True)
        logp = F.log_softmax(out.logits[:, :-1].float(), dim=-1)
        nll -= logp.gather(-1, ids[:, 1:, None]).sum().item()
        count += ids[:, 1:].numel()
        counts = [torch.bincount(r.float().sigmoid().topk(top_k, -1).indices.flatten(), minlength=r.shape[-1])
                  for r in out.router_logits]
        usage = counts if usage is None else [u + c for u, c in zip(usage, counts)]
    ratios = [(u.max() / u.min().clamp(min=1)).item() for u in usage]
    return {
        "heldout_tokens": count,
        "heldout_ppl": math.exp(nll / count),
        "expert_usage": [u.tolist() for u in usage],
        "usage_max_min_ratio": ratios,
    }


def unigram_ppl(train_stream: torch.Tensor, heldout_stream: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on the training tokens."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[heldout_stream[1:]].mean().item())


def train_demo(out: Path, cfg: TrainConfig = TrainConfig()) -> dict:
    """Train into a temporary sibling of `out`, then rename it: `out` never holds half a model."""
    with atomic_directory(out) as tmp:
        stats = _train_into(tmp, cfg)
    return stats


def _train_into(out: Path, cfg: TrainConfig) -> dict:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.time()

    train_docs, heldout_docs = corpus.split_stdlib()
    shipped = corpus.shipped_heldout(heldout_docs)
    with open(out / "heldout.jsonl", "w") as f:
        for rel, text in shipped:
            f.write(json.dumps({"path": rel, "text": text}) + "\n")

    tokenizer = train_tokenizer([t for _, t in train_docs], cfg.vocab_size)
    tokenizer.save_pretrained(out)
    train_stream = token_stream(tokenizer, [t for _, t in train_docs])
    heldout_stream = token_stream(tokenizer, [t for _, t in shipped])

    model = AutoModelForCausalLM.from_config(
        demo_model_config(len(tokenizer)), dtype=torch.float32, experts_implementation="grouped_mm"
    )
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    top_k = model.config.num_experts_per_tok
    log = []
    model.train()
    bar = tqdm(range(cfg.steps), desc="train demo", unit="step")
    for step in bar:
        starts = torch.randint(0, train_stream.numel() - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        ids = torch.stack([train_stream[s : s + cfg.seq_len] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        out_ = model(ids, labels=ids, output_router_logits=True)
        aux = balance_loss(out_.router_logits, top_k)
        loss = out_.loss + cfg.balance_coef * aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == cfg.steps - 1:
            log.append({"step": step, "lm_loss": out_.loss.item(), "balance": aux.item()})
            bar.set_postfix(lm=f"{out_.loss.item():.3f}", bal=f"{aux.item():.3f}")

    # Ship bf16 (the size budget); measure what ships, loaded the way paretoq loads it.
    model = model.to(torch.bfloat16)
    model.config.use_cache = True
    model.save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, experts_implementation="eager", local_files_only=True
    )
    stats = heldout_metrics(model, heldout_stream, cfg.seq_len)
    stats.update(
        unigram_ppl=unigram_ppl(train_stream, heldout_stream, len(tokenizer)),
        train_tokens_seen=cfg.steps * cfg.batch_size * cfg.seq_len,
        train_stream_tokens=train_stream.numel(),
        train_files=len(train_docs),
        heldout_files_shipped=len(shipped),
        parameters=sum(p.numel() for p in model.parameters()),
        seconds=round(time.time() - started, 1),
        torch_threads=torch.get_num_threads(),
        config=asdict(cfg),
        log=log,
    )
    (out / "training.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats
