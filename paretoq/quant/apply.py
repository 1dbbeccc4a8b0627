"""Quantize a set of components from a capture's Hessians: experts batched, RTN where no token came."""

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
    rtn_fallback: list[str] = field(default_factory=list)  # experts no calibration token reached

    def update(self, other: QuantizedComponents) -> None:
        self.tensors.update(other.tensors)
        self.loss.update(other.loss)
        self.rtn_fallback.extend(other.rtn_fallback)


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
        seen = [k for k in keys if capture.tokens.get(k, 0) > 0]
        for k in keys:
            if k not in seen:
                out.tensors[k] = rtn(adapter.weight(k), b, settings.group_size, settings.sym)
                out.loss[k] = float("nan")
                out.rtn_fallback.append(k)
        if not seen:
            continue
        W = torch.stack([adapter.weight(k).detach() for k in seen])
        H = torch.stack([capture.hessian(k) for k in seen])
        res = gptq(W.to(H.device), H, b, settings)
        for i, k in enumerate(seen):
            out.tensors[k] = res.q[i]
            out.loss[k] = float(res.loss[i])
    return out
