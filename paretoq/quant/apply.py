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

import numpy as np
import torch

from paretoq.capture import Capture
from paretoq.errors import ParetoqError
from paretoq.models import Adapter
from paretoq.quant.gptq import HessianFactor, gptq, hessian_factor
from paretoq.quant.quantizer import GGMLTensor, QuantizedTensor, QuantSettings, rtn
from paretoq.quant.settings import GGML_TYPES


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
    adapter: Adapter, capture: Capture, bits: dict[str, int], settings: QuantSettings,
    factors: dict[str, HessianFactor] | None = None,
) -> QuantizedComponents:
    """GPTQ every key of ``bits`` at its width, from ``capture``'s Hessians and ``adapter``'s current weights.

    One Hessian factor per input serves every component reading it (q/k/v, gate/up) at every width
    asked; routed experts of a layer are batched, a chunk of experts at a time. ``factors``: a dict
    kept by the caller across calls on the same capture and settings (the calibration walk calls
    once per width): each input is factored once, and its Hessian is then dropped from ``capture``.
    A component that saw too few calibration tokens is rounded to nearest and listed in ``rtn_fallback``.
    """
    if settings.method == "ggml":
        return _ggml_components(adapter, capture, bits)
    out = QuantizedComponents()
    readers: dict[str, list[str]] = defaultdict(list)  # input site -> the keys that read it, by projection
    for key in sorted(bits, key=lambda k: adapter.component(k).proj):
        out.tokens[key] = int(capture.tokens.get(key, 0))
        if out.tokens[key] < MIN_TOKENS:
            out.tensors[key] = rtn(adapter.weight(key), bits[key], settings.group_size, settings.sym)
            out.loss[key] = float("nan")
            out.rtn_fallback.append(key)
        else:
            readers[capture.site[key]].append(key)
    batches: dict[tuple, list[str]] = defaultdict(list)  # sites quantized together
    for site, keys in readers.items():
        c = adapter.component(keys[0])
        shapes = tuple((adapter.component(k).proj, adapter.component(k).shape) for k in keys)
        batches[("experts", c.layer, shapes) if c.kind == "expert" else (site,)].append(site)
    for sites in batches.values():
        cols = adapter.component(readers[sites[0]][0]).shape[1]
        chunk = max(1, GPTQ_BATCH_BYTES // (cols * cols * 4 * GPTQ_COPIES))
        for start in range(0, len(sites), chunk):  # experts are independent: batching only saves launches
            part = sites[start : start + chunk]
            factor = _factor(capture, part, settings, factors)
            for j in range(len(readers[part[0]])):  # each projection reading these inputs
                keys = [readers[site][j] for site in part]
                for b in sorted({bits[k] for k in keys}):
                    idx = [i for i, k in enumerate(keys) if bits[k] == b]
                    W = torch.stack([adapter.weight(keys[i]).detach() for i in idx]).to(factor.hinv.device)
                    res = gptq(W, None, b, settings, factor=factor if len(idx) == len(keys) else factor[idx])
                    for n, i in enumerate(idx):
                        out.tensors[keys[i]] = res.q[n]
                        out.loss[keys[i]] = float(res.loss[n])
                    del W, res
            del factor
    return out


def _ggml_components(adapter: Adapter, capture: Capture, bits: dict[str, int]) -> QuantizedComponents:
    """llama.cpp's quantizers (`paretoq.quant.ggml`) at each key's ggml type (where its blocks do not
    tile a row, the type llama-quantize falls back to: `paretoq.quant.ggml.stored_type`), weighted by
    the importance llama-quantize would read from `paretoq imatrix`: the input's mean square over the
    tokens the component saw (the Hessian's diagonal over its token count). A component below
    ``MIN_TOKENS`` gets no importance (as llama-quantize does for an expert with count 0) and is
    listed in ``rtn_fallback``. The loss is the layer's output error trace((W - Q) H (W - Q)^T): the
    sensitivity scaling uses only its ratios between widths, as it does GPTQ's."""
    from paretoq.quant.ggml import kv_b_split, quantize, split_kv_b, stored_type

    out = QuantizedComponents()
    config = adapter.model.config
    for key, b in bits.items():
        W = adapter.weight(key).detach().float().cpu()
        tokens = out.tokens[key] = int(capture.tokens.get(key, 0))
        H = capture.hessians.get(capture.site.get(key, "")) if tokens >= MIN_TOKENS else None
        split = kv_b_split(adapter.component(key), config)
        if split is None:
            t = stored_type(GGML_TYPES[b], W.shape[-1])  # llama-quantize's fallback where the blocks do not tile a row
            importance = None if H is None else (H.diagonal().float().cpu() / tokens).numpy()
            q = GGMLTensor(torch.from_numpy(quantize(W.numpy(), t, importance)), t, b)
        else:  # as the converter stores it: attn_k_b and attn_v_b, which no imatrix entry names (so none is used)
            parts = split_kv_b(W.numpy(), split[0], split[1])
            types = [stored_type(GGML_TYPES[b], p.shape[1]) for p in parts]
            data = np.concatenate([quantize(p, t).reshape(-1) for p, t in zip(parts, types)])
            q = GGMLTensor(torch.from_numpy(data), "+".join(types), b, (*split, W.shape[1]))
        out.tensors[key] = q
        if H is None:
            out.loss[key] = float("nan")
            out.rtn_fallback.append(key)
        else:
            E = W - q.dequantize()
            out.loss[key] = float(((E @ H.float().cpu()) * E).sum())
    return out


def quantize_outer(adapter: Adapter, bits: dict[str, int], settings: QuantSettings) -> QuantizedComponents:
    """The token embedding and output head (`paretoq.models.OUTER_KINDS`) at llama.cpp's types,
    without importance, as llama-quantize quantizes them: llama-imatrix collects none for them
    (``token_embd`` is a row lookup, not a product; ``output.weight`` only with ``--process-output``),
    and llama-quantize then passes no importance (checked against llama.cpp 0c1e570). The loss is the
    squared error ``||W - Q||^2`` (no Hessian is captured outside the layers); the sensitivity
    scaling uses only its ratios between widths."""
    from paretoq.quant.ggml import quantize, stored_type

    if settings.method != "ggml":
        raise ParetoqError(f"{next(iter(bits))!r} (the token embedding or output head) is quantized only by "
                           "llama.cpp's types; search or quantize it with --target llamacpp")
    out = QuantizedComponents()
    for key, b in bits.items():
        weight = adapter.weight(key).detach()
        t = stored_type(GGML_TYPES[b], weight.shape[-1])
        # a few rows at a time in float32: DeepSeek-V3's embedding is 0.9G weights, 3.7 GB in float32
        rows = max(1, OUTER_CHUNK_WEIGHTS // weight.shape[-1])
        data, loss = [], 0.0
        for start in range(0, weight.shape[0], rows):
            W = weight[start : start + rows].float().cpu()
            q = GGMLTensor(torch.from_numpy(quantize(W.numpy(), t)), t, b)
            loss += float(((W - q.dequantize()) ** 2).sum())
            data.append(q.data)
        out.tensors[key] = GGMLTensor(torch.cat(data), t, b)
        out.loss[key] = loss
        out.tokens[key] = 0
    return out


OUTER_CHUNK_WEIGHTS = 1 << 26  # 256 MB of float32 rows at a time


def _factor(capture: Capture, sites: list[str], settings: QuantSettings,
            factors: dict[str, HessianFactor] | None) -> HessianFactor:
    """The Hessian factor of ``sites`` (a batch), from ``factors`` where every site is there, else computed
    (and, with ``factors``, kept there per site and the Hessians dropped from ``capture``)."""
    if factors is not None and all(s in factors for s in sites):
        got = [factors[s] for s in sites]
        perm = None if got[0].perm is None else torch.stack([f.perm for f in got])
        return HessianFactor(torch.stack([f.hinv for f in got]), torch.stack([f.dead for f in got]),
                             torch.stack([f.damp for f in got]), perm)
    factor = hessian_factor(torch.stack([capture.hessians[s] for s in sites]), settings)
    if factors is not None:
        for i, s in enumerate(sites):
            factors[s] = factor[i]
            del capture.hessians[s]
    return factor
