"""llama.cpp's 8-bit activations: each matrix product's input rounded as ggml rounds it.

ggml multiplies a quantized weight by activations quantized too, to the weight type's
``vec_dot_type`` (``ggml-cpu.c``'s type traits): q8_K (blocks of 256 values, one float scale) for
the K-quants and most i-quants, q8_0 / q8_1 (blocks of 32, an fp16 scale) for the legacy types.
Float weights (f32, f16, bf16) take float activations. At the KL of a 4-bit file this rounding
adds 4-9% of KL (studies/llamacpp/activations.md), so `paretoq eval --gguf` scores a GGUF as
llama.cpp computes it unless told ``--gguf-activations exact``.

The rounding is applied where transformers multiplies: `torch.nn.functional.linear`, which
``nn.Linear`` and the eager Experts modules both call. `rounded_linear_inputs` intercepts it with a
torch function mode for the duration and recognises a weight by its storage, so the experts of one
layer, views of one stacked tensor, share one rounding (the coarser where their types differ).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

Rounding = tuple[int, bool]  # (block, scale stored in fp16)
Q8_K: Rounding = (256, False)
Q8_0: Rounding = (32, True)
FLOAT_TYPES = frozenset({"f32", "f16", "bf16", "f64"})
# vec_dot_type q8_0 or q8_1 (the same values: q8_1 adds the block's sum)
LEGACY_TYPES = frozenset({"q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "iq4_nl", "mxfp4", "nvfp4", "q1_0"})


def rounding_for(ggml_type: str) -> Rounding | None:
    """How ggml rounds the activations a weight of ``ggml_type`` multiplies; None: not at all."""
    t = ggml_type.lower()
    if t in FLOAT_TYPES:
        return None
    return Q8_0 if t in LEGACY_TYPES else Q8_K


def coarser(a: Rounding | None, b: Rounding | None) -> Rounding | None:
    """Of two roundings, the one with the larger block (more error): one weight tensor, one rounding."""
    if a is None or b is None:
        return a or b
    return a if a[0] >= b[0] else b


def round_like_ggml(x: torch.Tensor, block: int, fp16_scale: bool) -> torch.Tensor:
    """``x`` as ggml's q8 quantizers store it, dequantized back, per block of the last dimension:

    - q8_0 / q8_1 (``fp16_scale``): scale ``d = amax / 127``, codes ``round(x / d)`` from the fp32
      scale, halves away from zero, values ``code * fp16(d)``;
    - q8_K: the block's signed extreme ``m`` gives ``iscale = -127 / m``, codes
      ``round(iscale * x)`` (halves to even) capped at 127, values ``code / iscale`` in fp32.
    """
    shape = x.shape
    xb = x.float().reshape(-1, shape[-1] // block, block)
    if fp16_scale:
        d = xb.abs().amax(-1, keepdim=True) / 127
        v = xb * torch.where(d > 0, 1 / d, torch.zeros_like(d))
        q = torch.sign(v) * torch.floor(v.abs() + 0.5)
        out = q * d.half().float()
    else:
        m = xb.gather(-1, xb.abs().argmax(-1, keepdim=True))
        # tensor / tensor: torch computes ``scalar / tensor`` through a reciprocal, an ulp off C's division
        iscale = torch.where(m != 0, torch.full_like(m, -127.0) / m, torch.zeros_like(m))
        q = torch.round(iscale * xb).clamp(max=127)
        out = torch.where(m != 0, q * (torch.ones_like(iscale) / iscale), torch.zeros_like(xb))
    return out.reshape(shape).to(x.dtype)


@contextmanager
def rounded_linear_inputs(weights: Iterable[tuple[torch.Tensor, Rounding | None]]) -> Iterator[None]:
    """Every ``F.linear`` whose weight shares storage with one of ``weights`` gets its input rounded
    as paired, for the duration (views of one tensor: the coarser rounding). Inputs whose width is
    not a whole number of blocks are left as they are (ggml would have stored such a weight as a
    float type). A torch function mode sees every call, however the caller bound ``linear``."""
    rounding: dict[int, Rounding] = {}
    for w, r in weights:
        if r is not None:
            ptr = w.untyped_storage().data_ptr()
            rounding[ptr] = coarser(rounding.get(ptr), r)
    if not rounding:
        yield
        return
    with _RoundedLinear(rounding):
        yield


class _RoundedLinear(TorchFunctionMode):
    def __init__(self, rounding: dict[int, Rounding]):
        super().__init__()
        self.rounding = rounding

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        # the mode is off inside this call: the rounding's own torch ops are not seen by it
        x = args[0] if len(args) > 0 else kwargs.pop("input")
        w = args[1] if len(args) > 1 else kwargs.pop("weight")
        r = self.rounding.get(w.untyped_storage().data_ptr())
        if r is not None and x.shape[-1] % r[0] == 0:
            x = round_like_ggml(x, *r)
        return func(x, w, *args[2:], **kwargs)
