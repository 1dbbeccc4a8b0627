"""Read a checkpoint's tensors by name from its safetensors shards, a few at a time.

The layer walk reads one decoder layer's tensors, uses them and drops them. Shards are opened with
``safe_open`` (memory-mapped) only for the tensors asked for and closed again by ``release()``, so
the pages of a layer that has been used do not stay mapped into the process: its resident memory
follows the layer being read, not the shards it has touched.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from paretoq.errors import ParetoqError

INDEX = "model.safetensors.index.json"


def weight_map(model_dir: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the shard index or the single ``model.safetensors``."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise ParetoqError(f"{index} is not a valid shard index (no weight_map); re-save the model") from None
        for name in sorted(set(mapping.values())):
            if not (model_dir / name).is_file():
                raise ParetoqError(f"{index} names shard {name!r}, which is not in {model_dir}; "
                                   f"copy the missing shard or re-save the model")
        return dict(mapping)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ParetoqError(f"{model_dir} holds no *.safetensors weights; save the model with "
                           f"save_pretrained(safe_serialization=True)")
    mapping: dict[str, str] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                mapping.update(dict.fromkeys(fh.keys(), f.name))
        except Exception as exc:  # a truncated or foreign file: the header does not parse
            raise ParetoqError(f"cannot read {f} ({exc}); the file is damaged: copy or save it again") from None
    return mapping


def _expert_projections(converter) -> list[str]:
    """The per-expert projection each source pattern of a fusing converter holds, in order."""
    target = converter.target_patterns[0].rsplit(".", 1)[-1]
    if target == "gate_up_proj":
        return ["gate_proj", "up_proj"][: len(converter.source_patterns)]
    return [target] * len(converter.source_patterns)


def model_names(names: list[str], model_type: str) -> dict[str, str]:
    """Model-side name -> checkpoint name, where they differ.

    Checkpoints keep each architecture's published names (Mixtral's ``block_sparse_moe.experts.0.w1``);
    transformers renames and fuses them at load time with its conversion mapping. This reads that
    same mapping, but maps each routed expert's tensor to the per-expert key paretoq uses
    (``mlp.experts.0.gate_proj.weight``) instead of fusing: the walk fills the fused tensor from them.
    """
    try:
        from transformers.conversion_mapping import WeightConverter, get_checkpoint_conversion_mapping

        rules = get_checkpoint_conversion_mapping(model_type) or []
    except Exception:  # another transformers: names are taken as they are
        return {}
    renames = [r for r in rules if not isinstance(r, WeightConverter)]
    experts = []
    for conv in (r for r in rules if isinstance(r, WeightConverter)):
        for pattern, proj in zip(conv.source_patterns, _expert_projections(conv)):
            if "*" in pattern:
                regex = re.compile(re.escape(pattern).replace(r"\*", r"(\d+)") + "$")
                experts.append((regex, pattern, proj))
    out = {}
    for name in names:
        renamed = name
        for r in renames:
            for src, dst in zip(r.source_patterns, r.target_patterns):
                renamed = re.sub(src, dst, renamed)
        for regex, pattern, proj in experts:
            m = regex.search(renamed)
            if m:
                head = renamed[: m.start()]
                stem = pattern.split("*")[0]  # e.g. "mlp.experts." or ".experts."
                renamed = f"{head}{stem}{m.group(1)}.{proj}.weight"
                break
        if renamed != name:
            out[renamed] = name
    return out


class ShardReader:
    """Tensors of one checkpoint by name (model-side names; see `model_names`). Handles stay open
    until ``release()``."""

    def __init__(self, model_dir: Path, model_type: str | None = None):
        self.model_dir = Path(model_dir)
        self.map = weight_map(self.model_dir)
        self.alias = model_names(list(self.map), model_type) if model_type else {}
        self._open: dict[str, object] = {}
        for file in sorted(set(self.map.values())):  # a truncated shard fails now, not after hours of work
            try:
                with safe_open(str(self.model_dir / file), framework="pt"):
                    pass
            except Exception as exc:
                raise ParetoqError(f"cannot read {self.model_dir / file} ({exc}); the shard is truncated or "
                                   f"damaged: copy or save it again") from None

    def __contains__(self, name: str) -> bool:
        return name in self.alias or name in self.map

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        name = self.alias.get(name, name)
        file = self.map[name]
        if file not in self._open:
            try:
                self._open[file] = safe_open(str(self.model_dir / file), framework="pt")
            except Exception as exc:
                raise ParetoqError(f"cannot read {self.model_dir / file} ({exc}); the shard is damaged: "
                                   f"copy or save it again") from None
        try:
            t = self._open[file].get_tensor(name)
        except Exception as exc:  # the header promised bytes the file does not have
            raise ParetoqError(f"cannot read tensor {name} from {self.model_dir / file} ({exc}); the shard is "
                               f"truncated or damaged: copy or save it again") from None
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    def release(self) -> None:
        """Close every open shard (their memory maps go with them)."""
        self._open.clear()
