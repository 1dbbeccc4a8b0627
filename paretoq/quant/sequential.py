"""`paretoq quantize`: sequential GPTQ of a whole model under a plan, saved as a packed checkpoint.

One walk over the layers (`paretoq.walk`): the calibration activations that leave the already
quantized layers 0..L-1 enter layer L, read from the shards onto the device; a capture of that
layer alone collects its Hessians, its components are GPTQ-quantized on the device, their
dequantized weights replace the originals, and the calibration activations go through the
quantized layer to become layer L+1's inputs. The layer's packed tensors are written as one shard
of the checkpoint and the layer is freed: memory is one layer plus the activations.

`sequential_gptq` is the same procedure on a model held whole in memory (a capture pass from layer
0 per layer); the tests check the two agree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from paretoq.cache import atomic_directory, check_writable_dir
from paretoq.capture import DEFAULT_BATCH_SIZE, capture, in_pass, layer_captures
from paretoq.data import DEFAULT_CALIB_TOKENS, DEFAULT_EVAL_TOKENS, DEFAULT_SEQ_LEN, TokenSet, load_token_sets, read_documents
from paretoq.errors import ParetoqError
from paretoq.models import Adapter
from paretoq.plan import Plan
from paretoq.quant.apply import QuantizedComponents, quantize_components
from paretoq.quant.checkpoint import CheckpointWriter, layer_state
from paretoq.quant.quantizer import BITS
from paretoq.quant.settings import settings_for
from paretoq.walk import StreamedModel, open_model


@dataclass(frozen=True)
class QuantizeResult:
    out: Path
    plan: Plan
    avg_bits: float
    size_bytes: int
    rtn_fallback: list[str]
    seconds: float


def sequential_gptq(adapter: Adapter, plan: Plan, calib: TokenSet, batch_size: int = DEFAULT_BATCH_SIZE,
                    progress: bool = True) -> QuantizedComponents:
    """Quantize the plan's components in place, layer by layer; returns the quantized tensors."""
    plan.validate(adapter)
    done = QuantizedComponents()
    layers = sorted({adapter.component(k).layer for k in plan.bits})
    for layer in tqdm(layers, desc="quantize", unit="layer", disable=not progress):
        cap = capture(adapter, calib, batch_size=batch_size, block_samples=0, progress=False, layers={layer})
        bits = {k: b for k, b in plan.bits.items() if adapter.component(k).layer == layer}
        q = quantize_components(adapter, cap, bits, plan.quant)
        for key, t in q.tensors.items():
            adapter.set_weight(key, t.dequantize())
        done.update(q)
    return done


@torch.no_grad()
def _walk_quantize(sm: StreamedModel, plan: Plan, calib: TokenSet, writer: CheckpointWriter, dtype: torch.dtype,
                   batch_size: int, progress: bool) -> QuantizedComponents:
    """Quantize ``plan`` in one walk, writing each layer's shard as soon as it is done."""
    adapter = sm.adapter
    ids = calib.input_ids
    shapes = [tuple(ids[s : s + batch_size].shape) for s in range(0, ids.shape[0], batch_size)]
    hidden = sm.embed(ids, batch_size)
    done = QuantizedComponents()
    for i in tqdm(range(sm.num_layers), desc="quantize", unit="layer", disable=not progress):
        bits = {k: b for k, b in plan.bits.items() if adapter.component(k).layer == i}
        with sm.layer(i) as layer:
            q = QuantizedComponents()
            if bits:
                # Every pass captures the layer as read: its weights change only once all are quantized.
                for cap, chunk, first in layer_captures(sm, i, layer, hidden, shapes, torch.zeros(0, dtype=torch.long),
                                                        ids.flatten()):
                    q.update(quantize_components(adapter, cap, {k: b for k, b in bits.items()
                                                                if in_pass(adapter.component(k), chunk, first)},
                                                 plan.quant))
                    del cap
                for key, t in q.tensors.items():
                    adapter.set_weight(key, t.dequantize())
            hidden = [sm.run(i, layer, x, shape) for x, shape in zip(hidden, shapes)]
            writer.add(*layer_state(adapter, i, q.tensors, dtype))
            if sm.resident:  # the next stage reads the original weights again
                sm.free(i)
        done.rtn_fallback.extend(q.rtn_fallback)
        done.loss.update(q.loss)
        done.tokens.update(q.tokens)
    return done


def quantize(
    plan: str | Path | None = None,
    out: str | Path = "quantized",
    model: str = "demo",
    uniform: int | None = None,
    calib: str = "demo",
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    device: str = "cpu",
    dtype: str | None = None,
    max_memory: str | int | None = None,
    progress: bool = True,
    trust_remote_code: bool = False,
    quant: dict | None = None,
) -> QuantizeResult:
    """Quantize ``model`` under ``plan`` (a plan.json) or ``uniform`` bits, and write a packed checkpoint.
    ``quant``: quantizer settings (``QuantSettings`` field -> value) over the plan's own."""
    started = time.time()
    if (plan is None) == (uniform is None):
        raise ParetoqError("pass either --plan plan.json or --uniform BITS")
    if uniform is not None and uniform not in BITS:
        raise ParetoqError(f"--uniform {uniform} is not a bit choice; pass one of {', '.join(map(str, BITS))}")
    the_plan = Plan.load(plan) if plan is not None else Plan({})
    the_plan.quant = settings_for(quant or {}, base=the_plan.quant)
    if the_plan.quant.method != "gptq":
        raise ParetoqError(f"{plan} is a plan for llama.cpp's quantizers (quant method {the_plan.quant.method!r}), "
                           "which llama-quantize applies; run paretoq export --format llamacpp on it")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ParetoqError(f"--out {out} already exists and is not empty; pass a new directory")
    check_writable_dir(out)  # before minutes of GPTQ, not after
    docs = read_documents(calib)
    sm = open_model(model, dtype=dtype, device=device, max_memory=max_memory, trust_remote_code=trust_remote_code)
    if uniform is not None:
        the_plan = Plan.uniform(sm.adapter, uniform, quant=the_plan.quant)
    the_plan.validate(sm.adapter)  # every check before any work
    the_plan.model = {"name_or_path": str(model), "model_type": sm.model.config.model_type}
    sets = load_token_sets(sm.loaded.tokenizer, calib, calib_tokens, eval_tokens, seq_len, seed, documents=docs)
    # Full-precision tensors are stored in bf16 (as published checkpoints are), quantized ones packed.
    with atomic_directory(out) as tmp:
        writer = CheckpointWriter(tmp, sm.num_layers + 1)
        q = _walk_quantize(sm, the_plan, sets.calib, writer, torch.bfloat16, DEFAULT_BATCH_SIZE, progress)
        writer.add(*layer_state(sm.adapter, None, {}, torch.bfloat16))
        writer.finish(the_plan, sm.adapter, sm.model.config, sm.loaded.tokenizer)
    return QuantizeResult(out, the_plan, the_plan.avg_bits(sm.adapter), the_plan.size_bytes(sm.adapter),
                          sorted(q.rtn_fallback), time.time() - started)
