"""Quantized replacements for `nn.Linear` and for the fused Experts module of every MoE architecture.

Each module keeps its packed codes, scales and zeros as buffers (so ``model.to(device)`` moves
them) and computes on them directly: on CUDA through the Triton kernels, elsewhere through the torch
references beside them (dequantize per group, then matmul), which give the same numbers to fp16
tolerance. ``backend`` is ``"auto"`` (that choice), ``"triton"`` or ``"torch"``.
"""

from __future__ import annotations

import torch
from torch import nn

from paretoq.kernels.layout import PackedWeight
from paretoq.kernels.moe import PackedExperts, fused_moe, fused_moe_reference
from paretoq.kernels.qmm import qmm, qmm_reference

BACKENDS = ("auto", "triton", "torch")
_FIELDS = ("qweight", "scales", "zeros")


def use_triton(backend: str, x: torch.Tensor) -> bool:
    return backend == "triton" or (backend == "auto" and x.is_cuda)


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` held as packed 2/3/4/8-bit codes."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None, backend: str = "auto"):
        super().__init__()
        for f in _FIELDS:
            self.register_buffer(f, getattr(weight, f))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.bits, self.in_features, self.group_size = weight.bits, weight.in_features, weight.group_size
        self.out_features = weight.out_features
        self.backend = backend

    @property
    def packed(self) -> PackedWeight:
        return PackedWeight(self.qweight, self.scales, self.zeros, self.bits, self.in_features, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mm = qmm if use_triton(self.backend, x) else qmm_reference
        y = mm(x.reshape(-1, self.in_features), self.packed, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size}, backend={self.backend}"


def _default_gate(experts: nn.Module) -> bool:
    """True when the experts compute silu(gate) * up on [gate | up] rows: the kernel fuses that."""
    from transformers.activations import SiLUActivation
    from transformers.integrations.moe import _default_apply_gate

    return (experts.has_gate and getattr(experts, "is_concatenated", True)
            and getattr(type(experts), "_apply_gate", None) is _default_apply_gate
            and isinstance(getattr(experts, "act_fn", None), (SiLUActivation, nn.SiLU)))


class QuantExperts(nn.Module):
    """Drop-in for a fused Experts module: ``forward(hidden_states, top_k_index, top_k_weights)``.

    The original module is kept (unregistered, its weight tensors dropped) only for its own gate
    function where that is not plain SwiGLU (GPT-OSS's clamped, interleaved one).
    """

    def __init__(self, packed: PackedExperts, experts: nn.Module, backend: str = "auto"):
        super().__init__()
        self.num_experts, self.hidden, self.intermediate = packed.num_experts, packed.hidden, packed.intermediate
        self.num_slots, self.backend = packed.num_slots, backend
        self.up_bits, self.down_bits = sorted(packed.up), sorted(packed.down)
        for stage, weights, slots in (("up", packed.up, packed.up_slots), ("down", packed.down, packed.down_slots)):
            for b, w in weights.items():
                for f in _FIELDS:
                    self.register_buffer(f"{stage}{b}_{f}", getattr(w, f))
                self.register_buffer(f"{stage}{b}_slots", slots[b])
                setattr(self, f"{stage}{b}_meta", (w.in_features, w.group_size))
        self.register_buffer("up_bias", packed.up_bias)
        self.register_buffer("down_bias", packed.down_bias)
        for name in ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias"):
            if name in experts._parameters:
                del experts._parameters[name]
        self.fused_gate = _default_gate(experts)
        object.__setattr__(self, "_experts", experts)  # not a submodule: no weights, no double registration

    @property
    def packed(self) -> PackedExperts:
        def stage(name, bits):
            weights, slots = {}, {}
            for b in bits:
                k, gs = getattr(self, f"{name}{b}_meta")
                weights[b] = PackedWeight(*(getattr(self, f"{name}{b}_{f}") for f in _FIELDS), b, k, gs)
                slots[b] = getattr(self, f"{name}{b}_slots")
            return weights, slots

        up, up_slots = stage("up", self.up_bits)
        down, down_slots = stage("down", self.down_bits)
        return PackedExperts(self.num_experts, self.hidden, self.intermediate, self.num_slots, up, up_slots, down,
                             down_slots, self.up_bias, self.down_bias)

    def apply_gate(self, h: torch.Tensor) -> torch.Tensor:
        """The architecture's own gate on ``[gate | up]`` rows (interleaved first where it expects that)."""
        ex = self._experts
        if not ex.has_gate:
            return ex.act_fn(h)
        if not getattr(ex, "is_concatenated", True):
            h = torch.stack(h.chunk(2, dim=-1), dim=-1).flatten(-2)
        return ex._apply_gate(h)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        x = hidden_states.reshape(-1, self.hidden)
        run = fused_moe if use_triton(self.backend, x) else fused_moe_reference
        y = run(x, top_k_index.reshape(x.shape[0], -1), top_k_weights.reshape(x.shape[0], -1), self.packed,
                apply_gate=None if self.fused_gate else self.apply_gate)
        return y.reshape(hidden_states.shape)
