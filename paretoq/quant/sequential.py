"""`paretoq quantize`: sequential GPTQ of a whole model under a plan, saved as a packed checkpoint.

Layer by layer: the calibration tokens run through the model whose earlier layers already hold
their quantized weights, a capture restricted to the current layer collects its Hessians (the
pass stops right after that layer), its components are GPTQ-quantized, and their dequantized
weights replace the originals before the next layer is captured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from paretoq.cache import check_writable_dir
from paretoq.capture import DEFAULT_BATCH_SIZE, capture
from paretoq.data import DEFAULT_CALIB_TOKENS, DEFAULT_EVAL_TOKENS, DEFAULT_SEQ_LEN, TokenSet, load_token_sets, read_documents
from paretoq.errors import ParetoqError
from paretoq.models import Adapter, load_model
from paretoq.plan import Plan
from paretoq.quant.apply import QuantizedComponents, quantize_components
from paretoq.quant.checkpoint import save_quantized
from paretoq.quant.quantizer import BITS


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
    progress: bool = True,
    trust_remote_code: bool = False,
) -> QuantizeResult:
    """Quantize ``model`` under ``plan`` (a plan.json) or ``uniform`` bits, and write a packed checkpoint."""
    started = time.time()
    if (plan is None) == (uniform is None):
        raise ParetoqError("pass either --plan plan.json or --uniform BITS")
    if uniform is not None and uniform not in BITS:
        raise ParetoqError(f"--uniform {uniform} is not a bit choice; pass one of {', '.join(map(str, BITS))}")
    the_plan = Plan.load(plan) if plan is not None else None
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ParetoqError(f"--out {out} already exists and is not empty; pass a new directory")
    check_writable_dir(out)  # before minutes of GPTQ, not after
    docs = read_documents(calib)
    loaded = load_model(model, device=device, trust_remote_code=trust_remote_code)
    if the_plan is None:
        the_plan = Plan.uniform(loaded.adapter, uniform)
    the_plan.validate(loaded.adapter)  # every check before any work
    the_plan.model = {"name_or_path": str(model), "model_type": loaded.model.config.model_type}
    sets = load_token_sets(loaded.tokenizer, calib, calib_tokens, eval_tokens, seq_len, seed, documents=docs)
    q = sequential_gptq(loaded.adapter, the_plan, sets.calib, progress=progress)
    save_quantized(loaded, the_plan, q.tensors, out)
    return QuantizeResult(out, the_plan, the_plan.avg_bits(loaded.adapter), the_plan.size_bytes(loaded.adapter),
                          sorted(q.rtn_fallback), time.time() - started)
