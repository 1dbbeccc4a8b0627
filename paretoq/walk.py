"""The layer walk: one decoder layer at a time, read from the shards onto the device, run over the
boundary activations of every token set, then freed.

A `StreamedModel` is the model's skeleton on the meta device (shapes, no weights) with the parts
outside the decoder layers (embeddings, final norm, lm_head, rotary tables) materialised, and a
`ShardReader` over its checkpoint. ``layer(i)`` materialises decoder layer ``i`` in the compute
dtype on the device and frees it afterwards, so memory follows one layer plus the activations,
never the model. When the whole model fits in the memory it may use (``max_memory``), layers are
kept once read (``resident``): streaming is for when it does not fit.

Running a layer alone needs what the model's forward passes it (position embeddings, masks): they
are recorded once per batch shape by running the model's forward with every decoder layer swapped
for an identity stand-in (`boundary_inputs`). The stages built on the walk (calibration and the
quant cache in `paretoq.calibrate`, plan evaluation, sequential quantization) are loops over
``for i in range(n): with sm.layer(i) as layer: ...``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from paretoq.errors import ParetoqError
from paretoq.models.adapter import expert_bias_views, get_adapter
from paretoq.models.loading import DEMO, DTYPES, LoadedModel, load_tokenizer, read_config, resolve_model_dir
from paretoq.models.files import check_weight_files
from paretoq.models.shards import ShardReader

# Without --max-memory a model is kept resident when its weights take at most this share of the
# memory available to the process (the rest is left to activations, Hessians and caches).
RESIDENT_SHARE = 0.5


def return_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the system at once.

    glibc raises its mmap threshold (up to 32 MB) each time a large block is freed, after which
    tensors of a few MB come from the heap, where one layer's freed weights and Hessians fragment
    it and the process grows layer after layer. A fixed threshold keeps every tensor above it in
    its own mapping, returned on free, so memory follows the layer being processed.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB, and no more dynamic raising
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def parse_size(text: str | int | None) -> int | None:
    """``"24GB"``, ``"512MiB"``, ``"1e9"``, ``0`` -> bytes (None stays None)."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]i?B?|B)?\s*", str(text))
    if not m:
        raise ParetoqError(f"--max-memory {text!r} is not a size; pass e.g. 24GB, 512MiB or 0 (always stream)")
    value = float(m.group(1))
    unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    return int(value * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit])


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            f = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            f = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            raw = f.read_text().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            limits.append(int(raw))
    return min(limits) if limits else None


def available_memory(device: torch.device) -> int:
    """Bytes this process can still use on ``device`` (free GPU memory; host memory within its cgroup)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    avail = avail if avail is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    limit = _cgroup_limit()
    return min(avail, limit) if limit is not None else avail


def resolve_dtype(dtype: str | torch.dtype | None, config) -> torch.dtype:
    """The compute dtype: the user's, else the checkpoint's own ``dtype``/``torch_dtype``, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(own, torch.dtype):
            return own
        return DTYPES.get(str(own).removeprefix("torch."), torch.float32)
    if dtype not in DTYPES:
        raise ParetoqError(f"--dtype {dtype!r} is not supported; pass one of {', '.join(DTYPES)} or auto")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParetoqError("--device cuda was asked for, but this machine has no CUDA device; pass --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ParetoqError(f"--device {device} is not supported; pass cpu or cuda")
    return device


def compute_buffers(module: nn.Module, config, device) -> None:
    """Fill a module's non-persistent buffers (rotary tables), which no checkpoint holds, by building
    a fresh one from the config on ``device``."""
    if module._non_persistent_buffers_set:
        with torch.device(device):
            fresh = type(module)(config)
        for n in module._non_persistent_buffers_set:
            module._buffers[n] = fresh._buffers[n]


def _set_param(owner: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner._parameters[name] = nn.Parameter(tensor, requires_grad=False)


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


class _Stand(nn.Module):
    """Stands in for decoder layer ``index`` while the inputs the model passes it are recorded."""

    def __init__(self, index: int, sink, like: nn.Module):
        super().__init__()
        self.index, self.sink = index, sink
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(like, attr):
                setattr(self, attr, getattr(like, attr))

    def forward(self, hidden_states, *args, **kwargs):
        self.sink(self.index, hidden_states, args, kwargs)
        return hidden_states


@dataclass
class LayerCall:
    """What the model passes decoder layer ``i`` besides the hidden states, for one batch shape."""

    args: tuple
    kwargs: dict


class StreamedModel:
    """A model whose decoder layers stay in the checkpoint until they are used."""

    def __init__(self, loaded: LoadedModel, reader: ShardReader, dtype: torch.dtype, device: torch.device,
                 resident: bool):
        self.loaded, self.reader, self.dtype, self.device, self.resident = loaded, reader, dtype, device, resident
        self.model = loaded.model
        self.adapter = loaded.adapter
        self.layers = self.adapter.layers
        self.prefix = self.adapter.layers_prefix
        self._materialized: set[int] = set()
        self._calls: dict[tuple, list[LayerCall]] = {}
        self._load_outside()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    # -- weights -----------------------------------------------------------------------------------
    def _load_outside(self) -> None:
        """Embeddings, final norm, lm_head and rotary tables: read once, kept on the device."""
        model, config = self.model, self.model.config
        layer_ids = {id(p) for p in self.layers.parameters()}
        for name, p in list(model.named_parameters(remove_duplicate=False)):
            if id(p) in layer_ids or p.device.type != "meta":
                continue
            owner, attr = _owner(model, name)
            if name in self.reader:
                _set_param(owner, attr, self._read(name, p.shape))
        if (getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in self.reader
                and hasattr(model, "lm_head")):
            model.lm_head.weight = model.get_input_embeddings().weight
        missing = [n for n, p in model.named_parameters() if id(p) not in layer_ids and p.device.type == "meta"]
        if missing:
            raise ParetoqError(f"the checkpoint in {self.loaded.path} has no tensor {missing[0]}; "
                               f"is it a complete {config.model_type} model?")
        for name, module in list(model.named_modules()):
            if name.startswith(self.prefix + ".") or name == self.prefix:
                continue
            if any(b.device.type == "meta" for b in module.buffers(recurse=False)):
                persistent = {n for n in module._buffers if n not in module._non_persistent_buffers_set}
                if persistent - {n for n in persistent if f"{name}.{n}" in self.reader}:
                    raise ParetoqError(f"the checkpoint has no buffer under {name}; re-save the model")
                for n in persistent:
                    module._buffers[n] = self.reader.get(f"{name}.{n}", device=self.device)
                compute_buffers(module, config, self.device)
        self.reader.release()

    def reread_outside(self, name: str) -> torch.Tensor:
        """Parameter ``name`` outside the decoder layers (``lm_head.weight``) as the checkpoint holds
        it: what a streamed evaluation puts back after swapping it, instead of holding a copy."""
        p = self.model.get_parameter(name)
        t = self._read(name, p.shape)
        self.reader.release()
        return t

    def _read(self, name: str, shape) -> torch.Tensor:
        t = self.reader.get(name, self.dtype, self.device)
        if tuple(t.shape) != tuple(shape):
            raise ParetoqError(f"tensor {name} in {self.loaded.path} has shape {tuple(t.shape)}, the config gives "
                               f"{tuple(shape)}; the weights do not belong to this config.json")
        return t

    def materialize(self, i: int) -> nn.Module:
        """Read decoder layer ``i`` onto the device (a no-op when it is already there)."""
        layer = self.layers[i]
        if i in self._materialized:
            return layer
        base = f"{self.prefix}.{i}"
        fused: list[tuple[nn.Module, str]] = []
        for name, p in list(layer.named_parameters()):
            owner, attr = _owner(layer, name)
            full = f"{base}.{name}"
            if full in self.reader:
                _set_param(owner, attr, self._read(full, p.shape))
            else:  # a fused expert tensor stored one expert at a time: filled below
                _set_param(owner, attr, torch.empty(p.shape, dtype=self.dtype, device=self.device))
                fused.append((owner, attr))
        for name, b in list(layer.named_buffers()):
            owner, attr = _owner(layer, name)
            if f"{base}.{name}" in self.reader:
                owner._buffers[attr] = self.reader.get(f"{base}.{name}", device=self.device)
            elif b.device.type == "meta":
                raise ParetoqError(f"the checkpoint has no tensor {base}.{name}; re-save the model")
        if fused:
            self._fill_experts(i, fused)
        self.reader.release()
        self._materialized.add(i)
        return layer

    def _fill_experts(self, i: int, fused: list[tuple[nn.Module, str]]) -> None:
        owners = {id(o) for o, _ in fused}
        for block in self.adapter.moe_blocks:
            if block.layer != i or id(block.experts) not in owners:
                continue
            for e in range(block.num_experts):
                biases = expert_bias_views(block.experts, e)
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    key = f"{block.experts_path}.{e}.{proj}"
                    if not self.adapter.has(key):
                        continue
                    name = f"{key}.weight"
                    if name not in self.reader:
                        raise ParetoqError(f"the checkpoint in {self.loaded.path} has neither "
                                           f"{block.experts_path}'s fused tensors nor {name}; re-save the model")
                    view = self.adapter.weight(key)
                    with torch.no_grad():
                        view.copy_(self._read(name, view.shape))
                        if proj in biases:
                            biases[proj].copy_(self._read(f"{key}.bias", biases[proj].shape))
            owners.discard(id(block.experts))
        if owners:
            raise ParetoqError(f"layer {i} has fused tensors the checkpoint does not hold; re-save the model")

    def free(self, i: int) -> None:
        """Give layer ``i``'s weights back (they return to the meta device)."""
        for module in self.layers[i].modules():
            for attr, p in module._parameters.items():
                if p is not None and p.device.type != "meta":
                    module._parameters[attr] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                            requires_grad=False)
        self._materialized.discard(i)

    @contextmanager
    def layer(self, i: int) -> Iterator[nn.Module]:
        """Layer ``i`` on the device for the block; freed after it unless the model is resident."""
        layer = self.materialize(i)
        try:
            yield layer
        finally:
            if not self.resident:
                self.free(i)

    def materialize_all(self) -> None:
        """Every layer on the device and kept there (for what runs the whole model: lm-eval, generation)."""
        for i in range(self.num_layers):
            self.materialize(i)
        self.resident = True

    def layer_weight_bytes(self, i: int) -> int:
        return sum(p.numel() for p in self.layers[i].parameters()) * self.dtype.itemsize

    # -- activations -------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, ids: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
        """Layer 0's input for every batch of ``ids`` (and the calls each layer gets, recorded once per shape)."""
        out: list[torch.Tensor] = []
        for start in range(0, ids.shape[0], batch_size):
            batch = ids[start : start + batch_size].to(self.device)
            shape = tuple(batch.shape)
            record = shape not in self._calls
            calls: list[LayerCall | None] = [None] * self.num_layers

            def sink(i, hidden, args, kwargs, record=record, calls=calls):
                if i == 0:
                    out.append(hidden)
                if record:
                    calls[i] = LayerCall(args, {k: v for k, v in kwargs.items() if k != "hidden_states"})

            originals = list(self.layers)
            for i, layer in enumerate(originals):
                self.layers[i] = _Stand(i, sink, layer)
            try:
                self.model.model(input_ids=batch, use_cache=False)
            finally:
                for i, layer in enumerate(originals):
                    self.layers[i] = layer
            if record:
                self._calls[shape] = calls  # type: ignore[assignment]
        return out

    @torch.no_grad()
    def run(self, i: int, layer: nn.Module, hidden: torch.Tensor, shape: tuple) -> torch.Tensor:
        """Layer ``i`` over one batch of hidden states; ``shape`` is the batch's token-id shape."""
        call = self._calls[shape][i]
        out = layer(hidden, *call.args, **call.kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token log-probs ``[B, T-1, V]`` in float32 from the last layer's output."""
        h = self.model.model.norm(hidden)
        logits = self.model.lm_head(h)[:, :-1]
        return F.log_softmax(logits.float(), dim=-1)


def weight_bytes(loaded: LoadedModel, dtype: torch.dtype) -> int:
    return sum(p.numel() for p in loaded.model.parameters()) * dtype.itemsize


def open_model(name_or_path: str | Path = "demo", dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", max_memory: str | int | None = None,
               trust_remote_code: bool = False) -> StreamedModel:
    """The model as a skeleton on meta plus its shards: nothing of the decoder layers is read yet.

    ``max_memory`` (bytes or a size such as ``"24GB"``; ``0`` always streams) caps what the model's
    weights may hold on the device: a model that fits is kept resident once read.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    device = resolve_device(device)
    path = resolve_model_dir(name_or_path)
    config = read_config(path, trust_remote_code)
    check_weight_files(path)  # missing or truncated shards: one line now, not after hours
    if dtype in (None, "auto") and str(name_or_path) == DEMO:
        dtype = torch.float32  # the bundled demo (11M parameters) keeps computing as its studies were recorded
    dtype = resolve_dtype(dtype, config)
    reader = ShardReader(path, config.model_type)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="eager",
                                                 trust_remote_code=trust_remote_code)
    model.eval()
    loaded = LoadedModel(model, load_tokenizer(path), get_adapter(model), str(name_or_path), path)
    cap = parse_size(max_memory)
    if cap is None:
        cap = int(available_memory(device) * RESIDENT_SHARE)
    resident = weight_bytes(loaded, dtype) <= cap
    if not resident:  # a resident model frees nothing; there the fixed threshold only costs page faults
        return_freed_memory()
    return StreamedModel(loaded, reader, dtype, device, resident=resident)
