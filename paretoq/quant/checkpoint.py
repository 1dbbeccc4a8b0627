"""Packed checkpoints: what `paretoq quantize` writes and `paretoq.load_quantized` reads.

A checkpoint directory holds the model's ``config.json`` and tokenizer, the ``plan.json`` it was
made from, ``quantization.json`` (format, settings, and per quantized component its bits, shape and
group size) and the tensors, in ``model.safetensors`` or, as `paretoq quantize` writes them one
decoder layer at a time, in shards ``model-00001-of-000NN.safetensors`` listed by
``model.safetensors.index.json`` (Hugging Face's layout), with

- ``<key>.qweight`` (int32, codes packed as in ``paretoq.quant.pack``), ``<key>.scales`` and
  ``<key>.zeros`` (fp16, ``[out, groups]``) for each quantized component;
- ``<key>.weight`` for each component the plan leaves in full precision;
- every other tensor of the model (embeddings, norms, routers, biases, ...) under its own name.

The fused expert tensors themselves are not stored: every slice of them is a component.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from paretoq.cache import atomic_directory
from paretoq.errors import ParetoqError
from paretoq.models import Adapter, LoadedModel, get_adapter, load_tokenizer
from paretoq.models.files import safetensors_data_end
from paretoq.plan import Plan
from paretoq.quant.pack import pack, unpack
from paretoq.quant.quantizer import QuantizedTensor

CHECKPOINT_FORMAT = "paretoq.quantized/1"


def _component_params(adapter: Adapter) -> set[str]:
    """State-dict names of the tensors that components slice (never stored as such)."""
    names = {f"{c.key}.weight" for c in adapter.components if c.kind != "expert"}
    for b in adapter.moe_blocks:
        for p in ("gate_up_proj", "up_proj", "down_proj"):
            if hasattr(b.experts, p):
                names.add(f"{b.experts_path}.{p}")
    return names


def layer_state(adapter: Adapter, layer: int | None, tensors: dict[str, QuantizedTensor],
                dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The checkpoint tensors of decoder layer ``layer`` (None: everything outside the decoder
    layers) and the index entries of its quantized components."""
    skip = _component_params(adapter)
    prefix = f"{adapter.layers_prefix}."
    if layer is None:
        named = [(n, t) for n, t in adapter.model.state_dict(keep_vars=True).items() if not n.startswith(prefix)]
    else:
        base = f"{prefix}{layer}."
        named = [(base + n, t) for n, t in adapter.layers[layer].state_dict(keep_vars=True).items()]
    state = {}
    for name, t in named:
        if name not in skip:
            t = t.detach()
            state[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous().cpu().clone()
    index = {}
    for c in adapter.components:
        if c.layer != layer or layer is None:
            continue
        if c.key in tensors:
            q = tensors[c.key]
            state[f"{c.key}.qweight"] = pack(q.codes.cpu(), q.bits)
            state[f"{c.key}.scales"] = q.scales.to(torch.float16).contiguous().cpu()
            state[f"{c.key}.zeros"] = q.zeros.to(torch.float16).contiguous().cpu()
            index[c.key] = {"bits": q.bits, "shape": list(c.shape), "group_size": q.group_size}
        else:
            state[f"{c.key}.weight"] = adapter.weight(c).detach().to(dtype).contiguous().cpu().clone()
    return state, index


class CheckpointWriter:
    """Writes a checkpoint one piece (a decoder layer, or what lies outside them) at a time, each
    into its own shard, so that nothing of earlier layers stays in memory."""

    def __init__(self, directory: Path, pieces: int):
        self.directory, self.pieces = Path(directory), pieces
        self.weight_map: dict[str, str] = {}
        self.components: dict[str, dict] = {}
        self._written = 0

    def add(self, state: dict[str, torch.Tensor], index: dict[str, dict]) -> None:
        self._written += 1
        name = f"model-{self._written:05d}-of-{self.pieces:05d}.safetensors"
        save_file(state, str(self.directory / name), metadata={"format": CHECKPOINT_FORMAT})
        self.weight_map.update(dict.fromkeys(state, name))
        self.components.update(index)

    def finish(self, plan: Plan, adapter: Adapter, config, tokenizer) -> None:
        (self.directory / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"format": CHECKPOINT_FORMAT}, "weight_map": self.weight_map}, indent=1) + "\n")
        (self.directory / "quantization.json").write_text(json.dumps(
            {"format": CHECKPOINT_FORMAT, "quant": plan.quant.to_dict(), "components": self.components}, indent=1)
            + "\n")
        plan.save(self.directory / "plan.json", adapter)
        config.save_pretrained(self.directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.directory)


def save_quantized(loaded: LoadedModel, plan: Plan, tensors: dict[str, QuantizedTensor], out: Path,
                   dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the checkpoint into a temporary sibling of ``out`` and rename it into place."""
    adapter = loaded.adapter
    skip = _component_params(adapter)
    state = {}
    for name, t in adapter.model.state_dict().items():
        if name not in skip:
            state[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    index = {}
    for c in adapter.components:
        if c.key in tensors:
            q = tensors[c.key]
            state[f"{c.key}.qweight"] = pack(q.codes, q.bits)
            state[f"{c.key}.scales"] = q.scales.to(torch.float16).contiguous()
            state[f"{c.key}.zeros"] = q.zeros.to(torch.float16).contiguous()
            index[c.key] = {"bits": q.bits, "shape": list(c.shape), "group_size": q.group_size}
        else:
            state[f"{c.key}.weight"] = adapter.weight(c).detach().to(dtype).contiguous()
    with atomic_directory(out) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": CHECKPOINT_FORMAT})
        (tmp / "quantization.json").write_text(json.dumps(
            {"format": CHECKPOINT_FORMAT, "quant": plan.quant.to_dict(), "components": index}, indent=1) + "\n")
        plan.save(tmp / "plan.json", adapter)
        loaded.model.config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
    return out


def read_quantized(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    if not (path / "quantization.json").is_file():
        raise ParetoqError(f"{path} is not a paretoq checkpoint (no quantization.json); make one with `paretoq quantize`")
    redo = "make it again with `paretoq quantize`"
    try:
        index = json.loads((path / "quantization.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ParetoqError(f"{path / 'quantization.json'} is truncated or not JSON; {redo}") from None
    if not isinstance(index, dict) or index.get("format") != CHECKPOINT_FORMAT:
        found = index.get("format") if isinstance(index, dict) else type(index).__name__
        raise ParetoqError(f"{path} has checkpoint format {found!r}; this paretoq reads {CHECKPOINT_FORMAT}")
    if not isinstance(index.get("components"), dict):
        raise ParetoqError(f"{path / 'quantization.json'} has no \"components\" object; {redo}")
    shards = path / "model.safetensors.index.json"
    if shards.is_file():  # written by `paretoq quantize`, one shard per layer
        try:
            files = sorted(set(json.loads(shards.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise ParetoqError(f"{shards} is truncated or malformed; {redo}") from None
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        weights = path / name
        if not weights.is_file():
            raise ParetoqError(f"{path} has no {name}; {redo}")
        end, size = safetensors_data_end(weights, redo), weights.stat().st_size
        if size < end:
            raise ParetoqError(f"{weights} is truncated ({size:,} of {end:,} bytes); {redo}")
        state.update(load_file(str(weights)))
    return index, state


def quantized_tensor(state: dict[str, torch.Tensor], key: str, info: dict) -> QuantizedTensor:
    codes = unpack(state[f"{key}.qweight"], info["bits"], info["shape"][1])
    return QuantizedTensor(codes, state[f"{key}.scales"].float(), state[f"{key}.zeros"].float(), info["bits"],
                           info["group_size"])


def rebuild(path: str | Path, dtype: torch.dtype = torch.float32):
    """The model of a checkpoint with every stored tensor in place: ``(model, adapter, index, state)``.

    Components the plan leaves in full precision are written into the model; quantized ones are
    left for the caller (dequantized by `load_quantized`, packed modules in `paretoq.runtime`).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from paretoq.walk import compute_buffers

    path = Path(path)
    index, state = read_quantized(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    # Built on meta (no random init of tensors about to be overwritten), then given the stored tensors.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="eager")
    adapter = get_adapter(model)
    rest = {k: v for k, v in state.items() if not k.endswith((".qweight", ".scales", ".zeros"))}
    components = {c.key for c in adapter.components}  # the embedding and head are stored as they are
    plain = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in rest.items()
             if k.removesuffix(".weight") not in components}
    missing, unexpected = model.load_state_dict(plain, strict=False, assign=True)
    missing = set(missing) - _component_params(adapter)
    if missing or unexpected:
        raise ParetoqError(f"{path} does not match its config: missing {sorted(missing)[:3]}, unexpected {unexpected[:3]}")
    for module in model.modules():  # component tensors: filled below (or replaced by packed modules)
        for attr, p in module._parameters.items():
            if p is not None and p.device.type == "meta":
                module._parameters[attr] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=False)
        if any(b.device.type == "meta" for b in module.buffers(recurse=False)):
            compute_buffers(module, config, "cpu")
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in plain:
        model.tie_weights()
    for c in adapter.components:
        if c.key not in index["components"]:
            adapter.set_weight(c, state[f"{c.key}.weight"])
    return model, adapter, index, state


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Rebuild a model from a packed checkpoint, with each component's dequantized weight in place.

    (`paretoq.runtime.load_runtime` instead keeps the codes packed and computes on them.)
    """
    path = Path(path)
    model, adapter, index, state = rebuild(path, dtype)
    for key, info in index["components"].items():
        adapter.set_weight(key, quantized_tensor(state, key, info).dequantize())
    model.to(device).eval()
    return LoadedModel(model, load_tokenizer(path), adapter, str(path), path)
