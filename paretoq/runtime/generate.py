"""`paretoq generate`: greedy decoding with a quantized checkpoint, timed."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from paretoq.errors import ParetoqError
from paretoq.models.loading import DTYPES
from paretoq.runtime.modules import BACKENDS


@dataclass(frozen=True)
class Generation:
    text: str  # the new text only
    prompt_tokens: int
    new_tokens: list[int]
    seconds: float  # decoding after the prompt's forward pass
    backend: str
    device: str

    @property
    def tokens_per_s(self) -> float:
        return len(self.new_tokens) / self.seconds if self.seconds > 0 else float("inf")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None):
    """Greedy tokens after ``input_ids [1, n]`` with the KV cache; returns (tokens, decode seconds).

    The clock starts after the prompt's forward pass, so tokens/s is the decode rate.
    """
    from transformers import DynamicCache

    device = input_ids.device
    cache = DynamicCache(config=model.config)
    logits = model(input_ids, cache=cache, use_cache=True).logits[:, -1]
    tokens: list[int] = []
    _sync(device)
    start = time.perf_counter()
    for _ in range(max_new_tokens):
        nxt = logits.argmax(-1, keepdim=True)
        tokens.append(int(nxt))
        if eos_token_id is not None and tokens[-1] == eos_token_id:
            break
        logits = model(nxt, cache=cache, use_cache=True).logits[:, -1]
    _sync(device)
    return tokens, time.perf_counter() - start


def generate(checkpoint: str, prompt: str, max_new_tokens: int = 64, device: str = "auto", dtype: str = "auto",
             backend: str = "auto") -> Generation:
    from paretoq.runtime.patch import load_runtime

    if max_new_tokens < 1:
        raise ParetoqError(f"--max-new-tokens {max_new_tokens} must be at least 1")
    if backend not in BACKENDS:
        raise ParetoqError(f"unknown backend {backend!r}; pass one of {', '.join(BACKENDS)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParetoqError("--device cuda was asked for but torch sees no CUDA device; pass --device cpu")
    if dtype == "auto":  # fp16 on the GPU (what the kernels are built for); fp32 on the CPU, where fp16 is slow
        dtype = "float16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ParetoqError(f"unknown dtype {dtype!r}; pass one of {', '.join(DTYPES)}")
    if backend == "triton" and not device.startswith("cuda"):
        raise ParetoqError("--backend triton needs --device cuda (on the CPU the torch backend computes the same)")
    loaded, _ = load_runtime(checkpoint, DTYPES[dtype], device, backend)
    tok = loaded.tokenizer
    if tok is None:
        raise ParetoqError(f"{checkpoint} has no tokenizer; save one beside the model before `paretoq quantize`")
    ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        raise ParetoqError("--prompt is empty after tokenization; pass some text")
    tokens, seconds = greedy(loaded.model, ids, max_new_tokens, tok.eos_token_id)
    used = "triton" if backend == "triton" or (backend == "auto" and device.startswith("cuda")) else "torch"
    return Generation(tok.decode(tokens), ids.shape[1], tokens, seconds, used, device)
