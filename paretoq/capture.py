"""One full-precision pass over the calibration tokens, with hooks that accumulate what the probes
and GPTQ need, batch by batch (no layer's activations are kept beyond the batch that made them):

- per MoE layer, the router's top-k expert ids and weights for every token;
- per component input, the Hessian ``H = sum_x x x^T`` over the tokens the component actually sees
  (a routed expert only the tokens routed to it; ``down_proj`` the expert's intermediate
  activations) and the token count. Components that read the same tensor (q/k/v, MLA's
  q_a/kv_a, an MLP's gate/up) share one Hessian, their input "site";
- per MLP sublayer, a seeded sample of the residual-stream states entering and leaving it, for
  the block cosine predictor.

Hessians are sums, not means: GPTQ scales them by ``2 / tokens`` itself (``Capture.hessian`` and
``Capture.tokens`` give both), so several captures can be added together.
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load, save_file
from torch import nn
from tqdm import tqdm

from paretoq.cache import atomic_write, atomic_write_text
from paretoq.data import TokenSet
from paretoq.models import Adapter

DEFAULT_BATCH_SIZE = 8
# States kept per MLP sublayer for the cosine predictor: enough to fit a 2-layer FFN of a few
# thousand weights and still hold a quarter out for scoring.
DEFAULT_BLOCK_SAMPLES = 4096
# The routed experts' float32 Hessians one capture pass may hold (`expert_chunks`). One pass covers a
# whole layer of Qwen3-30B-A3B (2.5 GB); Mixtral-8x7B (7.1 GB), Qwen3-235B-A22B (9.8 GB) and
# DeepSeek-V3 (57 GB) take 2, 3 and 14 passes, each a forward of the layer over the calibration
# tokens: cheap beside the GPTQ they feed, and what keeps a 256-expert layer within one device.
MAX_HESSIAN_BYTES = 4 << 30


@dataclass
class Routing:
    top_k_index: torch.Tensor  # [T, k] int64, expert ids, in calibration-token order
    top_k_weights: torch.Tensor  # [T, k] float32


@dataclass
class BlockStates:
    inputs: torch.Tensor  # [n, H] residual stream entering the MLP sublayer
    outputs: torch.Tensor  # [n, H] residual stream leaving it (input + the block's output)


@dataclass
class Capture:
    token_ids: torch.Tensor  # [T] calibration tokens, flattened in the order of routing rows
    routing: dict[int, Routing]  # MoE layer -> routing
    hessians: dict[str, torch.Tensor]  # input site -> sum of x x^T, [in, in]
    site: dict[str, str]  # component key -> input site
    tokens: dict[str, int]  # component key -> tokens it saw
    blocks: dict[int, BlockStates]  # layer -> sampled MLP-sublayer states
    meta: dict = field(default_factory=dict)

    def hessian(self, key: str) -> torch.Tensor:
        return self.hessians[self.site[key]]

    @property
    def num_tokens(self) -> int:
        return self.token_ids.numel()

    # -- persistence: safetensors for tensors, JSON beside it for the rest ---------------------
    def save(self, path: Path) -> None:
        """Write ``path`` (safetensors) and ``path.with_suffix('.json')``, each atomically."""
        tensors = {"token_ids": self.token_ids.contiguous()}
        for site, H in self.hessians.items():
            tensors[f"hessian/{site}"] = H.contiguous()
        for layer, r in self.routing.items():
            tensors[f"routing/{layer}/index"] = r.top_k_index.contiguous()
            tensors[f"routing/{layer}/weights"] = r.top_k_weights.contiguous()
        for layer, b in self.blocks.items():
            tensors[f"block/{layer}/inputs"] = b.inputs.contiguous()
            tensors[f"block/{layer}/outputs"] = b.outputs.contiguous()
        atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp)))
        index = {"site": self.site, "tokens": self.tokens, "meta": self.meta}
        atomic_write_text(Path(path).with_suffix(".json"), json.dumps(index))

    @classmethod
    def load(cls, path: Path) -> Capture:
        tensors = load(Path(path).read_bytes())  # bytes, not a memory map: a damaged file raises
        index = json.loads(Path(path).with_suffix(".json").read_text())
        hessians, routing, blocks = {}, {}, {}
        for name, t in tensors.items():
            kind, _, rest = name.partition("/")
            if kind == "hessian":
                hessians[rest] = t
            elif kind == "routing":
                layer, part = rest.split("/")
                routing.setdefault(int(layer), {})[part] = t
            elif kind == "block":
                layer, part = rest.split("/")
                blocks.setdefault(int(layer), {})[part] = t
        return cls(
            token_ids=tensors["token_ids"],
            routing={k: Routing(v["index"], v["weights"]) for k, v in routing.items()},
            hessians=hessians,
            site=index["site"],
            tokens=index["tokens"],
            blocks={k: BlockStates(v["inputs"], v["outputs"]) for k, v in blocks.items()},
            meta=index["meta"],
        )


def expert_intermediate(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s activation after the gate (the input of its down_proj), computed the way the
    Experts module computes it: its own fused weights and its own ``_apply_gate``."""
    if experts.has_gate:
        W = experts.gate_up_proj[e]
        out = x @ W if experts.is_transposed else F.linear(x, W)
        if experts.has_bias:
            out = out + experts.gate_up_proj_bias[e]
        return experts._apply_gate(out)
    W = experts.up_proj[e]
    out = x @ W if experts.is_transposed else F.linear(x, W)
    if experts.has_bias:
        out = out + experts.up_proj_bias[e]
    return experts.act_fn(out)


def _accumulate(store: dict[str, torch.Tensor], site: str, x: torch.Tensor) -> None:
    x = x.reshape(-1, x.shape[-1])
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    H = x.T @ x
    if site in store:
        store[site] += H
    else:
        store[site] = H


class _StopForward(Exception):
    """Raised after the last layer a restricted capture needs: the rest of the pass is wasted work."""


class _Recorder:
    """The hooks of one capture pass and what they accumulate."""

    def __init__(self, adapter: Adapter, block_positions: torch.Tensor, hessians: bool = True,
                 experts: set[int] | None = None, others: bool = True):
        self.adapter = adapter
        self.want_hessians = hessians  # False: routing, token counts and block samples only (probes)
        # One pass of a chunked capture (`layer_captures`): the Hessians of these routed experts
        # only (None: all), and, when ``others``, everything else (non-expert Hessians, routing, block samples).
        self.experts, self.others = experts, others
        self.hessians: dict[str, torch.Tensor] = {}
        self.site: dict[str, str] = {}
        self.tokens: dict[str, int] = {}
        self.routing: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.block_in: dict[int, list[torch.Tensor]] = {}
        self.block_out: dict[int, list[torch.Tensor]] = {}
        self.block_positions = block_positions  # flat token positions to sample, sorted
        self.batch_start = 0  # flat position of the current batch's first token
        self._batch_sel: torch.Tensor | None = None
        self._pending_in: dict[int, torch.Tensor] = {}
        self._siblings: tuple[str, list[tuple[torch.Tensor, str]]] = ("", [])
        self.handles: list = []

    # Linear components: attention, dense MLP, shared experts
    def linear_hook(self, key: str, parent: str):
        def hook(module, args, output):
            x = args[0]
            name, seen = self._siblings
            if name != parent:  # a new parent module: forget the previous one's inputs
                seen = []
                self._siblings = (parent, seen)
            site = next((s for t, s in seen if t is x), None)
            if site is None:  # first reader of this tensor: it owns the site
                site = key
                seen.append((x, site))
                if self.want_hessians and self.others:
                    _accumulate(self.hessians, site, x)
            self.site[key] = site
            self.tokens[key] = self.tokens.get(key, 0) + x.numel() // x.shape[-1]

        return hook

    def experts_hook(self, layer: int, prefix: str, num_experts: int):
        def hook(module, args, kwargs):
            bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
            hidden, index, weights = list(bound.values())[:3]
            hidden = hidden.reshape(-1, hidden.shape[-1])
            if self.others:
                self.routing.setdefault(layer, []).append((index.detach().cpu().long(), weights.detach().float().cpu()))
            with torch.no_grad():
                for e in range(num_experts):
                    rows = (index == e).any(dim=-1).nonzero().squeeze(1)
                    x = hidden[rows]
                    keys = [f"{prefix}.{e}.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
                    site_in, site_down = f"{prefix}.{e}.input", f"{prefix}.{e}.down_proj"
                    if rows.numel() and self.want_hessians and (self.experts is None or e in self.experts):
                        _accumulate(self.hessians, site_in, x)
                        _accumulate(self.hessians, site_down, expert_intermediate(module, e, x))
                    for key in keys:
                        if self.adapter.has(key):
                            self.site[key] = site_down if key.endswith("down_proj") else site_in
                            self.tokens[key] = self.tokens.get(key, 0) + rows.numel()

        return hook

    # MLP sublayer states for the cosine predictor
    def block_in_hook(self, layer: int):
        def hook(module, args):
            if self._batch_sel is not None and self._batch_sel.numel():
                x = args[0].reshape(-1, args[0].shape[-1])
                self._pending_in[layer] = x[self._batch_sel].detach().float().cpu()

        return hook

    def block_out_hook(self, layer: int):
        def hook(module, args, output):
            if layer not in self._pending_in:
                return
            y = output[0] if isinstance(output, tuple) else output
            y = y.reshape(-1, y.shape[-1])[self._batch_sel].detach().float().cpu()
            x = self._pending_in.pop(layer)
            self.block_in.setdefault(layer, []).append(x)
            self.block_out.setdefault(layer, []).append(x + y)  # the decoder layer's residual add

        return hook

    def start_batch(self, batch_tokens: int) -> None:
        lo, hi = self.batch_start, self.batch_start + batch_tokens
        pos = self.block_positions
        self._batch_sel = pos[(pos >= lo) & (pos < hi)] - lo
        self._siblings = ("", [])

    def end_batch(self, batch_tokens: int) -> None:
        self.batch_start += batch_tokens
        self._siblings = ("", [])  # release the held inputs

    def attach(self, layers: set[int] | None = None, stop: bool = True) -> None:
        a = self.adapter
        modules = dict(a.model.named_modules())
        wanted = (lambda i: True) if layers is None else (lambda i: i in layers)
        for c in a.components:
            if c.kind != "expert" and wanted(c.layer):
                parent = c.key.rsplit(".", 1)[0]
                self.handles.append(modules[c.key].register_forward_hook(self.linear_hook(c.key, parent)))
        for b in a.moe_blocks:
            if not wanted(b.layer):
                continue
            hook = self.experts_hook(b.layer, b.experts_path, b.num_experts)
            self.handles.append(b.experts.register_forward_pre_hook(hook, with_kwargs=True))
        for i, layer in enumerate(a.layers):
            mlp = getattr(layer, a.arch.mlp, None)
            norm = getattr(layer, "post_attention_layernorm", None)
            if mlp is not None and norm is not None and wanted(i) and self.block_positions.numel() and self.others:
                self.handles.append(norm.register_forward_pre_hook(self.block_in_hook(i)))
                self.handles.append(mlp.register_forward_hook(self.block_out_hook(i)))
        if stop and layers:
            def stop_here(module, args, output):
                raise _StopForward

            self.handles.append(a.layers[max(layers)].register_forward_hook(stop_here))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def result(self, token_ids: torch.Tensor) -> Capture:
        """What the hooks accumulated, as a capture (the Hessians where they were computed)."""
        return Capture(
            token_ids=token_ids,
            routing={layer: Routing(torch.cat([i for i, _ in parts]), torch.cat([w for _, w in parts]))
                     for layer, parts in self.routing.items()},
            hessians=self.hessians, site=self.site, tokens=self.tokens,
            blocks={layer: BlockStates(torch.cat(self.block_in[layer]), torch.cat(self.block_out[layer]))
                    for layer in self.block_in})


@torch.no_grad()
def capture(
    adapter: Adapter,
    calib: TokenSet,
    batch_size: int = DEFAULT_BATCH_SIZE,
    block_samples: int = DEFAULT_BLOCK_SAMPLES,
    seed: int = 0,
    progress: bool = True,
    layers: set[int] | None = None,
) -> Capture:
    """Run the model over ``calib`` once and return what the hooks accumulated.

    ``layers`` restricts the capture to those decoder layers, and the pass stops after the last of
    them (sequential GPTQ captures one layer at a time through the partly quantized model).
    """
    model = adapter.model
    device = next(model.parameters()).device
    ids = calib.input_ids
    positions = block_positions(ids.numel(), block_samples, seed)
    rec = _Recorder(adapter, positions)
    rec.attach(layers)
    try:
        for start in tqdm(range(0, ids.shape[0], batch_size), desc="capture", unit="batch", disable=not progress):
            batch = ids[start : start + batch_size]
            rec.start_batch(batch.numel())
            try:
                model(batch.to(device), use_cache=False)
            except _StopForward:
                pass
            rec.end_batch(batch.numel())
    finally:
        rec.detach()
    cap = rec.result(ids.flatten().clone())
    cap.hessians = {k: v.cpu() for k, v in cap.hessians.items()}
    cap.meta = capture_meta(calib, positions, seed)
    return cap


def block_positions(total: int, block_samples: int, seed: int) -> torch.Tensor:
    """The flat calibration-token positions whose MLP-sublayer states are sampled, sorted."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=g)[: min(block_samples, total)].sort().values


def capture_meta(calib: TokenSet, positions: torch.Tensor, seed: int) -> dict:
    return {"calib": calib.source, "calib_fingerprint": calib.fingerprint(), "num_tokens": calib.input_ids.numel(),
            "seq_len": calib.seq_len, "block_samples": int(positions.numel()), "seed": seed}


@torch.no_grad()
def capture_layer(sm, i: int, layer, hidden: list[torch.Tensor], shapes: list[tuple], positions: torch.Tensor,
                  token_ids: torch.Tensor, hessians: bool = True, update: bool = False,
                  experts: set[int] | None = None, others: bool = True) -> Capture:
    """Run decoder layer ``i`` of a streamed model (`paretoq.walk.StreamedModel`) over the
    calibration batches ``hidden`` with the hooks attached, and return its capture. ``update``:
    replace each batch by the layer's output as it goes (the walk's next inputs, never two copies
    of the activations); otherwise the outputs are dropped (the caller changes the layer first).
    ``experts``/``others``: one pass of a chunked capture (`layer_captures`)."""
    rec = _Recorder(sm.adapter, positions, hessians=hessians, experts=experts, others=others)
    rec.attach({i}, stop=False)
    try:
        for j, (x, shape) in enumerate(zip(hidden, shapes)):
            tokens = math.prod(shape)
            rec.start_batch(tokens)
            y = sm.run(i, layer, x, shape)
            if update:
                hidden[j] = y
            rec.end_batch(tokens)
    finally:
        rec.detach()
    return rec.result(token_ids)


def expert_chunks(adapter: Adapter, layer: int, max_bytes: int) -> list[set[int] | None]:
    """The routed experts of ``layer`` split into chunks whose float32 Hessians (``in^2 * 4`` bytes
    per input site: the expert's input and its down projection's) fit in ``max_bytes``, one
    capture pass each; ``[None]`` (one pass, every expert) when they all fit or the layer has none."""
    block = next((b for b in adapter.moe_blocks if b.layer == layer), None)
    if block is None:
        return [None]
    per_expert = []
    for e in range(block.num_experts):
        sites = {}
        for proj in ("gate_proj", "up_proj", "down_proj"):
            key = f"{block.experts_path}.{e}.{proj}"
            if adapter.has(key):
                sites["down" if proj == "down_proj" else "in"] = adapter.component(key).shape[1]
        per_expert.append(sum(n * n * 4 for n in sites.values()))
    if sum(per_expert) <= max_bytes:
        return [None]
    chunks: list[set[int] | None] = [set()]
    used = 0
    for e, size in enumerate(per_expert):
        if chunks[-1] and used + size > max_bytes:  # a chunk holds at least one expert, whatever its size
            chunks.append(set())
            used = 0
        chunks[-1].add(e)
        used += size
    return chunks


def layer_captures(sm, i: int, layer, hidden: list[torch.Tensor], shapes: list[tuple], positions: torch.Tensor,
                   token_ids: torch.Tensor, update: bool = False, hessians: bool = True):
    """Layer ``i``'s capture with Hessians, in as many passes over the calibration batches as its
    routed experts' Hessians need to stay within `MAX_HESSIAN_BYTES` (`expert_chunks`): yields
    ``(capture, chunk, first)`` per pass. The first pass also holds the non-expert Hessians, the
    routing and the block samples; each pass holds its chunk's expert Hessians (``chunk`` None: all)
    and every component's token counts. Only the last pass replaces ``hidden`` (``update``), so
    every pass sees the same inputs and the Hessians equal one pass's. Each capture is the
    caller's to quantize and drop before the next pass runs. ``hessians=False``: one pass, none."""
    chunks = expert_chunks(sm.adapter, i, MAX_HESSIAN_BYTES) if hessians else [None]
    for c, chunk in enumerate(chunks):
        yield (capture_layer(sm, i, layer, hidden, shapes, positions, token_ids, hessians=hessians,
                             update=update and c == len(chunks) - 1, experts=chunk, others=c == 0), chunk, c == 0)


def in_pass(component, chunk: set[int] | None, first: bool) -> bool:
    """Whether a pass of `layer_captures` holds ``component``'s Hessian."""
    if component.kind == "expert":
        return chunk is None or component.expert in chunk
    return first


def capture_key(loaded, calib: TokenSet, block_samples: int = DEFAULT_BLOCK_SAMPLES, seed: int = 0) -> str:
    """The cache key of a capture; ``loaded`` may be a meta-device model (no weights needed)."""
    from paretoq.cache import digest, model_fingerprint

    dtype = str(next(loaded.model.parameters()).dtype)
    return digest("capture", model_fingerprint(loaded.path), calib.fingerprint(), dtype, block_samples, seed)


def cached_capture(
    loaded,
    calib: TokenSet,
    batch_size: int = DEFAULT_BATCH_SIZE,
    block_samples: int = DEFAULT_BLOCK_SAMPLES,
    seed: int = 0,
    use_cache: bool = True,
    progress: bool = True,
) -> tuple[Capture, str, bool]:
    """The capture of ``loaded`` over ``calib`` from the on-disk cache, or a new pass that fills it.

    Keyed by the model's fingerprint, the calibration tokens, the dtype and the sampling settings.
    Returns (capture, cache key, whether it came from the cache). An unreadable entry is recomputed.
    """
    from paretoq.cache import cache_root

    key = capture_key(loaded, calib, block_samples, seed)
    path = cache_root() / "captures" / f"{key}.safetensors"
    if use_cache and path.is_file():
        try:
            return Capture.load(path), key, True
        except Exception:  # truncated or corrupt entry: recompute below and overwrite it
            pass
    result = capture(loaded.adapter, calib, batch_size, block_samples, seed, progress)
    if use_cache:
        result.save(path)
    return result, key, False
