"""Read a GGUF back into the model's weights: what llama.cpp produced, measured on paretoq's scale.

`paretoq eval --gguf FILE` puts every searched component, the token embedding and the output
matrix of a GGUF into the model it was converted from, dequantized by `gguf`'s own code
(``gguf.quants.dequantize``), and measures KL, perplexity and agreement against the full-precision
model like any plan. Names come from the export's own map (`paretoq.export.llamacpp.gguf_names`);
the layouts are the inverse of llama.cpp's converter (``convert_hf_to_gguf.py`` and
``conversion/*.py``):

- routed experts are one 3-D tensor per layer and projection, ``[experts, out, in]``;
- DeepSeek's ``kv_b_proj`` is ``attn_kv_b``, or (newer converters) ``attn_k_b``, the first
  ``qk_nope_head_dim`` rows of each head transposed, ``[heads, kv_lora_rank, nope]``, and
  ``attn_v_b``, the other ``v_head_dim`` rows, ``[heads, v, kv_lora_rank]``;
- the ``llama`` architecture (Llama, Mistral, Mixtral) stores ``q_proj`` and ``k_proj`` with each
  head's rotary halves interleaved (``LlamaModel.permute``).

Norms and routers are left as the model has them: llama-quantize never quantizes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from paretoq.errors import ParetoqError
from paretoq.export.llamacpp import GGUF_ARCH, gguf_names
from paretoq.models import Adapter, Component
from paretoq.quant.ggml import dequantize_rows, merge_kv_b

# GPT-OSS is left out: its converter interleaves gate/up and stores MXFP4 blocks with biases.
READABLE = ("deepseek2", "llama", "olmoe", "qwen2", "qwen2moe", "qwen3", "qwen3moe")
PERMUTED_QK = ("llama",)  # GGUF architectures whose converter interleaves q/k rotary halves


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A float32 copy (F32 tensors come back as read-only views of the memory-mapped file)."""
    return torch.from_numpy(np.array(a, dtype=np.float32, order="C", copy=True))


def _reader(path: Path):
    from gguf import GGUFReader

    if not path.is_file():
        raise ParetoqError(f"GGUF file {path} does not exist; pass the path of a .gguf file")
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # bad magic, truncated: gguf raises ValueError and others
        raise ParetoqError(f"{path} is not a readable GGUF file ({exc}); pass a file llama.cpp wrote") from None


@dataclass
class GGUFWeights:
    """The weights of one GGUF, as the model's components (``[out, in]`` float32 tensors)."""

    path: Path
    arch: str
    tensors: dict  # GGUF tensor name -> gguf ReaderTensor
    config: object
    types: dict[str, str] = field(default_factory=dict)  # component key -> ggml type name(s), "+"-joined

    def _dequantize(self, name: str, index: int | None = None) -> np.ndarray:
        t = self.tensors[name]
        data = t.data if index is None else t.data[index]  # experts: one expert's rows, not the whole tensor
        return dequantize_rows(data, t.tensor_type)

    def weight(self, c: Component) -> torch.Tensor:
        names = [f"{n}.weight" for n in gguf_names(c)]
        if c.kind == "expert":
            w = self._dequantize(names[0], c.expert)
        elif c.proj == "kv_b_proj" and names[0] not in self.tensors:
            w = self._kv_b(names[1], names[2])
        else:
            w = self._dequantize(names[0])
            if self.arch in PERMUTED_QK and c.proj in ("q_proj", "k_proj"):
                heads = self.config.num_attention_heads if c.proj == "q_proj" else self.config.num_key_value_heads
                w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        return _tensor(w)

    def _kv_b(self, k_name: str, v_name: str) -> np.ndarray:
        return merge_kv_b(self._dequantize(k_name), self._dequantize(v_name))

    def as_plan(self, adapter: Adapter) -> tuple[Callable[[str, int], torch.Tensor], dict[str, int]]:
        """``(weight_of, bits)`` in the shape an evaluator takes a plan: every component from the file
        (the width, 0, is a placeholder: the file's type is the width)."""
        comps = {c.key: c for c in adapter.components}
        comps.update({c.key: c for c in adapter.outer if f"{gguf_names(c)[0]}.weight" in self.tensors})

        def weight_of(key: str, _bits: int) -> torch.Tensor:
            return self.weight(comps[key])

        return weight_of, dict.fromkeys(comps, 0)

    def input_rounding(self) -> dict[str, tuple[int, bool]]:
        """Component key (and "lm_head") -> how llama.cpp rounds that product's input for the
        file's type (`paretoq.export.ggml_activations`). DeepSeek's kv_b stored as attn_k_b /
        attn_v_b is left out: llama.cpp multiplies those with other inputs (the absorbed MLA)."""
        from paretoq.export.ggml_activations import rounding_for

        out = {k: rounding_for(t) for k, t in self.types.items() if "+" not in t}
        head = self.tensors.get("output.weight") or self.tensors.get("token_embd.weight")  # tied: the embedding
        if head is not None:
            out["lm_head"] = rounding_for(head.tensor_type.name)
        return {k: r for k, r in out.items() if r is not None}

    def bits(self, adapter: Adapter) -> tuple[float, int]:
        """(bits per weight over the components, the token embedding and output head included, as the
        file stores them; bytes of those tensors): what a ``--target llamacpp`` budget counts."""
        total_bits, params, nbytes = 0.0, 0, 0
        seen: set[str] = set()
        for c in [*adapter.components, *adapter.outer]:
            for name in (f"{n}.weight" for n in gguf_names(c)):
                t = self.tensors.get(name)
                if t is None or name in seen:
                    continue
                seen.add(name)
                n = int(np.prod([int(d) for d in t.shape]))
                total_bits += t.n_bytes * 8
                params += n
                nbytes += t.n_bytes
        return (total_bits / params if params else float("nan")), nbytes


def open_gguf(path: str | Path, adapter: Adapter, config) -> GGUFWeights:
    """Open ``path`` for ``adapter``'s model, checking before any work that it is a GGUF of this
    architecture holding every component at its shape."""
    path = Path(path)
    reader = _reader(path)
    field_ = reader.fields.get("general.architecture")
    arch = str(field_.contents()) if field_ is not None else None
    want = GGUF_ARCH.get(config.model_type)
    if want not in READABLE:
        raise ParetoqError(f"eval --gguf cannot read model type {config.model_type!r} yet; it reads the GGUF "
                           f"architectures {', '.join(READABLE)}")
    if arch != want:
        raise ParetoqError(f"{path} is a GGUF of architecture {arch!r}, but --model is a {config.model_type} "
                           f"(GGUF {want!r}); pass the --model the GGUF was converted from")
    g = GGUFWeights(path, arch, {t.name: t for t in reader.tensors}, config)
    experts = {b.layer: b.num_experts for b in adapter.moe_blocks}
    for c in adapter.components:
        names = [f"{n}.weight" for n in gguf_names(c)]
        if c.proj == "kv_b_proj" and names[0] not in g.tensors and all(n in g.tensors for n in names[1:]):
            names = names[1:]
            heads, nope = config.num_attention_heads, config.qk_nope_head_dim
            shapes = [(heads, c.shape[1], nope), (heads, config.v_head_dim, c.shape[1])]
        else:
            names = names[:1]
            shapes = [(experts[c.layer], *c.shape) if c.kind == "expert" else tuple(c.shape)]
        for name, shape in zip(names, shapes):
            t = g.tensors.get(name)
            if t is None:
                raise ParetoqError(f"{path} has no tensor {name} for {c.key}; pass a GGUF converted from this --model")
            got = tuple(int(d) for d in reversed(t.shape))  # gguf lists ggml's ne, innermost first
            if got != tuple(shape):
                raise ParetoqError(f"{path}'s {name} has shape {list(got)} where {c.key} needs {list(shape)}; "
                                   f"pass the --model the GGUF was converted from")
        g.types[c.key] = "+".join(g.tensors[n].tensor_type.name.lower() for n in names)
    for c in adapter.outer:  # the token embedding and output head: read where the file holds them
        name = f"{gguf_names(c)[0]}.weight"
        t = g.tensors.get(name)
        if t is not None and tuple(int(d) for d in reversed(t.shape)) != tuple(c.shape):
            raise ParetoqError(f"{path}'s {name} has shape {[int(d) for d in reversed(t.shape)]} where the model's "
                               f"{c.key} is {list(c.shape)}; pass the --model the GGUF was converted from")
    return g
