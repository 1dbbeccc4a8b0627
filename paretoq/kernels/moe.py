"""The fused MoE expert kernel for one layer whose experts (and projections) have different widths,
and its torch reference `fused_moe_reference` with the same signature.

Storage (`PackedExperts`): per stage, one stacked buffer per bit width present, plus a slot table
``[E, slots]`` giving each (expert, projection) its index in the buffer of its width, -1 elsewhere.
The up stage has slots (gate, up) (just (up,) for experts without a gate); the down stage one.

`fused_moe` runs, with no host synchronisation (so it can be captured in a CUDA graph):

1. `moe_align`: the ``T * top_k`` (token, k) assignments sorted by expert, each expert's run
   padded to ``BLOCK_M`` (as vLLM's fused MoE does), so one M block reads one expert's weights;
2. the up stage, one launch per width present (at most four): programs whose (block, slot) is
   stored at another width exit at once; each writes ``[gate | up]`` rows in sorted order;
3. the down stage, one launch per width: SwiGLU applied while loading its input (the activation
   is never written), the routing weight applied before the store, one row per assignment;
4. the sum over each token's ``top_k`` rows (fp32).

Experts no token chose get no M block and are never read. Weights are never dequantized to
memory: every width is unpacked tile by tile inside the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

from paretoq.kernels.layout import PackedWeight, dequantize, stack
from paretoq.kernels.qmm import ACT_NONE, ACT_SILU_MUL, MOE_DOWN, MOE_UP, k_splits, launch


@dataclass
class PackedExperts:
    """A layer's routed experts in the kernel layout."""

    num_experts: int
    hidden: int
    intermediate: int
    num_slots: int  # 2: gate and up; 1: up only
    up: dict[int, PackedWeight]  # bits -> stacked [C, I, ...] gate/up matrices at that width
    up_slots: dict[int, torch.Tensor]  # bits -> int32 [E, num_slots] index into up[bits], -1 if another width
    down: dict[int, PackedWeight]  # bits -> stacked [C, H, ...]
    down_slots: dict[int, torch.Tensor]  # bits -> int32 [E, 1]
    up_bias: torch.Tensor | None = None  # [E, num_slots * I]
    down_bias: torch.Tensor | None = None  # [E, H]

    @classmethod
    def build(cls, weights: dict[tuple[int, str], PackedWeight], num_experts: int,
              biases: dict[tuple[int, str], torch.Tensor] | None = None) -> PackedExperts:
        """From ``{(expert, proj): PackedWeight}`` with proj in gate_proj/up_proj/down_proj, ``[out, in]``."""
        has_gate = (0, "gate_proj") in weights
        up_projs = ("gate_proj", "up_proj") if has_gate else ("up_proj",)

        def stage(projs):
            by_bits: dict[int, list] = {}
            for e in range(num_experts):
                for j, p in enumerate(projs):
                    by_bits.setdefault(weights[(e, p)].bits, []).append((e, j, weights[(e, p)]))
            packed, slots = {}, {}
            for b, items in sorted(by_bits.items()):
                table = torch.full((num_experts, len(projs)), -1, dtype=torch.int32)
                for c, (e, j, _) in enumerate(items):
                    table[e, j] = c
                packed[b] = stack([w for _, _, w in items])
                slots[b] = table
            return packed, slots

        up, up_slots = stage(up_projs)
        down, down_slots = stage(("down_proj",))
        up_bias = down_bias = None
        if biases:
            up_bias = torch.stack([torch.cat([biases[(e, p)] for p in up_projs]) for e in range(num_experts)])
            down_bias = torch.stack([biases[(e, "down_proj")] for e in range(num_experts)])
        w0 = weights[(0, "down_proj")]
        return cls(num_experts, w0.out_features, w0.in_features, len(up_projs), up, up_slots, down, down_slots,
                   up_bias, down_bias)

    def to(self, device) -> PackedExperts:
        mv = lambda d: {b: t.to(device) for b, t in d.items()}  # noqa: E731
        opt = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedExperts(self.num_experts, self.hidden, self.intermediate, self.num_slots, mv(self.up),
                             mv(self.up_slots), mv(self.down), mv(self.down_slots), opt(self.up_bias),
                             opt(self.down_bias))

    def expert_nbytes(self, e: int) -> int:
        """Bytes of expert ``e``'s packed weights, scales and zeros (what a kernel reads when it is chosen)."""
        n = 0
        for packed, slots in ((self.up, self.up_slots), (self.down, self.down_slots)):
            for b, w in packed.items():
                n += int((slots[b][e] >= 0).sum()) * (w.nbytes() // w.qweight.shape[0])
        return n


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Assignments sorted by expert, each expert's run padded to ``block_m``; fixed sizes, no host sync.

    Returns ``sorted_ids [max_blocks * block_m]`` (assignment index ``token * top_k + k``, or ``S``
    for padding) and ``block_expert [max_blocks]`` (``num_experts`` past the last run). An expert
    with ``n`` tokens takes ``ceil(n / block_m)`` blocks, so at most ``S // block_m + min(S, E)``.
    """
    ids = topk_ids.reshape(-1).long()
    S, dev = ids.numel(), ids.device
    counts = torch.zeros(num_experts, dtype=torch.long, device=dev).scatter_add_(0, ids, torch.ones_like(ids))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(ids, stable=True)
    sorted_e = ids[order]
    rank = torch.arange(S, device=dev) - (torch.cumsum(counts, 0) - counts)[sorted_e]
    max_blocks = S // block_m + min(S, num_experts)
    sorted_ids = torch.full((max_blocks * block_m,), S, dtype=torch.int32, device=dev)
    sorted_ids[(padded_end - padded)[sorted_e] + rank] = order.to(torch.int32)
    starts = torch.arange(max_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(padded_end, starts, right=True).to(torch.int32)
    return sorted_ids, block_expert


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: PackedExperts,
              apply_gate: Callable[[torch.Tensor], torch.Tensor] | None = None,
              configs: dict | None = None) -> torch.Tensor:
    """``sum_k w[t,k] * expert_{ids[t,k]}(x[t])`` for ``x [T, H]`` (Triton).

    ``apply_gate`` maps ``[gate | up]`` rows ``[P, slots*I]`` to ``[P, I]``; None means SwiGLU
    (silu(gate) * up), fused into the down stage's load.
    """
    from paretoq.kernels.configs import moe_config

    T, top_k = topk_ids.shape
    S, E, I, H = T * top_k, experts.num_experts, experts.intermediate, experts.hidden
    x = x.contiguous()
    configs = configs or {}
    up_cfg = {b: configs.get(("up", b)) or moe_config("moe_up", T, I, H, b, x.device, S * experts.num_slots)
              for b in experts.up}
    down_cfg = {b: configs.get(("down", b)) or moe_config("moe_down", T, H, I, b, x.device, S)
                for b in experts.down}
    # One BLOCK_M for the layer: the sorted layout is shared by every launch.
    bm = max(c["BLOCK_M"] for c in (*up_cfg.values(), *down_cfg.values()))
    sorted_ids, block_expert = moe_align(topk_ids, E, bm)
    blocks = block_expert.numel()
    route_w = topk_weights.reshape(-1).float().contiguous()

    split = any(k_splits(up_cfg[b], w.group_size, H)[0] > 1 for b, w in experts.up.items())
    # split K adds partial sums into zeroed fp32 rows (kernels/qmm.py `k_splits`)
    h = torch.zeros(sorted_ids.numel(), experts.num_slots * I, dtype=torch.float32, device=x.device) if split \
        else torch.empty(sorted_ids.numel(), experts.num_slots * I, dtype=x.dtype, device=x.device)
    for b, w in experts.up.items():
        launch(x, w, h, M=S, grid_m=blocks * experts.num_slots, mode=MOE_UP, bias=experts.up_bias,
               sorted_ids=sorted_ids, block_expert=block_expert, slots=experts.up_slots[b], num_experts=E,
               top_k=top_k, num_slots=experts.num_slots, config={**up_cfg[b], "BLOCK_M": bm})
    h = h.to(x.dtype)
    if apply_gate is None:
        a, act = h, ACT_SILU_MUL
    else:
        a, act = apply_gate(h).contiguous(), ACT_NONE
    y = torch.zeros(S, H, dtype=torch.float32, device=x.device)
    for b, w in experts.down.items():
        launch(a, w, y, M=S, grid_m=blocks, mode=MOE_DOWN, act=act, bias=experts.down_bias, sorted_ids=sorted_ids,
               block_expert=block_expert, slots=experts.down_slots[b], route_w=route_w, num_experts=E,
               top_k=top_k, config={**down_cfg[b], "BLOCK_M": bm})
    return y.view(T, top_k, H).sum(1).to(x.dtype)


def _expert_weight(packed: dict[int, PackedWeight], slots: dict[int, torch.Tensor], e: int, j: int, dtype):
    for b, w in packed.items():
        c = int(slots[b][e, j])
        if c >= 0:
            return dequantize(PackedWeight(w.qweight[c], w.scales[c], w.zeros[c], b, w.in_features, w.group_size),
                              dtype)
    raise AssertionError(f"expert {e} slot {j} is stored at no width")


def fused_moe_reference(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                        experts: PackedExperts, apply_gate: Callable[[torch.Tensor], torch.Tensor] | None = None,
                        configs: dict | None = None) -> torch.Tensor:
    """The torch path: per chosen expert, dequantize its matrices, then the expert MLP on its tokens."""
    T, top_k = topk_ids.shape
    out = torch.zeros(T, experts.hidden, dtype=torch.float32, device=x.device)
    for e in torch.unique(topk_ids).tolist():
        tok, k = torch.where(topk_ids == e)
        xe = x[tok]
        h = torch.cat([xe @ _expert_weight(experts.up, experts.up_slots, e, j, x.dtype).T
                       for j in range(experts.num_slots)], dim=-1)
        if experts.up_bias is not None:
            h = h + experts.up_bias[e].to(h.dtype)
        if apply_gate is None:
            gate, up = h.chunk(2, dim=-1)
            h = torch.nn.functional.silu(gate) * up
        else:
            h = apply_gate(h)
        y = h @ _expert_weight(experts.down, experts.down_slots, e, 0, x.dtype).T
        if experts.down_bias is not None:
            y = y + experts.down_bias[e].to(y.dtype)
        out.index_add_(0, tok, y.float() * topk_weights[tok, k, None].float())
    return out.to(x.dtype)
