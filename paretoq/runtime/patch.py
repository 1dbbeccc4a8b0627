"""Swap quantized modules into a model: from a packed checkpoint, or from a plan and the quant cache."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from paretoq.errors import ParetoqError
from paretoq.kernels.layout import PackedWeight, dequantize, from_checkpoint, pack_weight
from paretoq.kernels.moe import PackedExperts
from paretoq.models import Adapter, LoadedModel, load_tokenizer
from paretoq.quant.quantizer import QuantizedTensor
from paretoq.runtime.modules import BACKENDS, QuantExperts, QuantLinear


@dataclass
class PatchReport:
    linears: int = 0  # nn.Linear modules replaced by QuantLinear
    expert_layers: int = 0  # Experts modules replaced by QuantExperts
    dequantized: list[str] = field(default_factory=list)  # components written back as full-precision weights


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def patch_model(adapter: Adapter, weights: dict[str, PackedWeight], backend: str = "auto") -> PatchReport:
    """Replace every component in ``weights`` (key -> packed weight) by a module computing on its codes.

    A layer's experts become one `QuantExperts` when all of their matrices are quantized. Where some
    stay in full precision, or the Experts module has a post-expert norm the kernel does not apply,
    the quantized ones are dequantized into the model's own tensors instead (listed in the report).
    """
    if backend not in BACKENDS:
        raise ParetoqError(f"unknown backend {backend!r}; pass one of {', '.join(BACKENDS)}")
    report = PatchReport()
    model = adapter.model
    for key, w in weights.items():
        c = adapter.component(key)
        if c.kind == "expert":
            continue
        linear = adapter._weights[key][0]
        _set_module(model, key, QuantLinear(w, linear.bias, backend))
        report.linears += 1
    for block in adapter.moe_blocks:
        keys = [c.key for c in adapter.components if c.kind == "expert" and c.layer == block.layer]
        present = [k for k in keys if k in weights]
        if not present:
            continue
        if len(present) == len(keys) and not getattr(block.experts, "has_post_expert_norm", False):
            per_expert = {(adapter.component(k).expert, adapter.component(k).proj): weights[k] for k in keys}
            biases = None
            if block.experts.has_bias:
                biases = {(adapter.component(k).expert, adapter.component(k).proj): adapter.bias(k).detach().clone()
                          for k in keys}
            packed = PackedExperts.build(per_expert, block.num_experts, biases)
            _set_module(model, block.experts_path, QuantExperts(packed, block.experts, backend))
            report.expert_layers += 1
        else:
            for k in present:
                adapter.set_weight(k, dequantize(weights[k]))
                report.dequantized.append(k)
    return report


def pack_components(tensors: dict[str, QuantizedTensor]) -> dict[str, PackedWeight]:
    return {k: pack_weight(q) for k, q in tensors.items()}


def from_plan(adapter: Adapter, plan, cache, backend: str = "auto") -> PatchReport:
    """Patch the model with the plan's components taken from a `QuantCache` (no new quantization)."""
    plan.validate(adapter)
    return patch_model(adapter, pack_components({k: cache.get(k, b) for k, b in plan.bits.items()}), backend)


def load_runtime(path: str | Path, dtype: torch.dtype = torch.float16, device: str = "cpu",
                 backend: str = "auto") -> tuple[LoadedModel, PatchReport]:
    """A `paretoq quantize` checkpoint as a model whose quantized components stay packed."""
    from paretoq.quant.checkpoint import rebuild

    path = Path(path)
    model, adapter, index, state = rebuild(path, dtype)
    weights = {key: from_checkpoint(state[f"{key}.qweight"], state[f"{key}.scales"], state[f"{key}.zeros"],
                                    info["bits"], info["shape"][1], info["group_size"])
               for key, info in index["components"].items()}
    report = patch_model(adapter, weights, backend)
    model.to(device).eval()
    return LoadedModel(model, load_tokenizer(path), adapter, str(path), path), report
