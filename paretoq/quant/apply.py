"""Quantize a set of components from a capture's Hessians: experts batched, RTN where too few tokens came.

A routed expert that received fewer than ``MIN_TOKENS`` calibration tokens has a Hessian of rank
below that count: GPTQ's error feedback would fit those few tokens (or, at zero tokens, divide by
an empty Hessian) rather than the expert's real inputs. Such components are rounded to nearest on
the same grid instead, listed in ``rtn_fallback``, and recorded as such in the quant cache, the
checkpoint and the search's report. Their loss is unknown (no Hessian): NaN in memory, null on disk.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from paretoq.capture import Capture
from paretoq.models import Adapter
from paretoq.quant.gptq import gptq
from paretoq.quant.quantizer import QuantizedTensor, QuantSettings, rtn


@dataclass
class QuantizedComponents:
    tensors: dict[str, QuantizedTensor] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)  # GPTQ's error proxy (NaN for RTN fallbacks)
    rtn_fallback: list[str] = field(default_factory=list)  # experts below MIN_TOKENS calibration tokens
    tokens: dict[str, int] = field(default_factory=dict)  # calibration tokens each component saw

    def update(self, other: QuantizedComponents) -> None:
        self.tensors.update(other.tensors)
        self.loss.update(other.loss)
        self.rtn_fallback.extend(other.rtn_fallback)
        self.tokens.update(other.tokens)


# Fewer calibration tokens than this and a component is rounded to nearest (see the module docstring).
# A handful: GPTQ with a damped Hessian still helps from a few dozen tokens, while one or two tokens
# give a rank-1 or rank-2 Hessian that GPTQ overfits.
MIN_TOKENS = 4

# Routed experts are quantized in batches whose Hessian work (about GPTQ_COPIES float32 [in, in]
# matrices per expert: H, its damped copy, the Cholesky factor and inverse) stays under this many
# bytes: 128 experts of hidden 2048 at once would need about 8 GB; batches keep a layer's GPTQ
# within a few hundred MB on any device.
GPTQ_BATCH_BYTES = 512 << 20
GPTQ_COPIES = 4


def quantize_components(
    adapter: Adapter, capture: Capture, bits: dict[str, int], settings: QuantSettings
) -> QuantizedComponents:
    """GPTQ every key of ``bits`` at its width, from ``capture``'s Hessians and ``adapter``'s current weights.

    Routed experts that share a layer, projection and width are quantized as one batch. A component
    that saw no calibration token has no Hessian worth the name: it is rounded to nearest and listed
    in ``rtn_fallback``.
    """
    out = QuantizedComponents()
    batches: dict[tuple, list[str]] = defaultdict(list)
    for key, b in bits.items():
        c = adapter.component(key)
        group = ("experts", c.layer, c.proj, b, c.shape) if c.kind == "expert" else (key,)
        batches[group].append(key)
    for keys in batches.values():
        b = bits[keys[0]]
        seen = [k for k in keys if capture.tokens.get(k, 0) >= MIN_TOKENS]
        for k in keys:
            out.tokens[k] = int(capture.tokens.get(k, 0))
            if k not in seen:
                out.tensors[k] = rtn(adapter.weight(k), b, settings.group_size, settings.sym)
                out.loss[k] = float("nan")
                out.rtn_fallback.append(k)
        if not seen:
            continue
        cols = adapter.component(seen[0]).shape[1]
        chunk = max(1, GPTQ_BATCH_BYTES // (cols * cols * 4 * GPTQ_COPIES))
        for start in range(0, len(seen), chunk):  # experts are independent: batching only saves launches
            part = seen[start : start + chunk]
            H = torch.stack([capture.hessian(k) for k in part])
            W = torch.stack([adapter.weight(k).detach() for k in part]).to(H.device)
            res = gptq(W, H, b, settings)
            for i, k in enumerate(part):
                out.tensors[k] = res.q[i]
                out.loss[k] = float(res.loss[i])
            del H, W, res
    return out
