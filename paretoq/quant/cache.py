"""The quant cache: every component GPTQ-quantized once per bit width from the full-precision capture.

The search assembles candidates from it (a trial costs an evaluation, not a quantization). One
entry per (layer, bits) holds that layer's components: codes, scales, zeros and GPTQ's loss, as
safetensors, written atomically. Entries are keyed by the capture key (model fingerprint,
calibration tokens, dtype), the quantizer settings, the layer and the width, so a second run
with the same inputs quantizes nothing and a change of data or settings misses.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load, save_file
from tqdm import tqdm

from paretoq.cache import atomic_write, cache_root, digest
from paretoq.capture import Capture
from paretoq.models import Adapter
from paretoq.quant.apply import quantize_components
from paretoq.quant.quantizer import BITS, QuantizedTensor, QuantSettings


def _metadata(blob: bytes) -> dict:
    """The ``__metadata__`` of a safetensors blob (an 8-byte little-endian header length, then JSON)."""
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]).get("__metadata__", {})


class QuantCache:
    def __init__(self, adapter: Adapter, capture: Capture, capture_key: str, settings: QuantSettings,
                 root: Path | None = None):
        self.adapter = adapter
        self.capture = capture
        self.settings = settings
        self.root = Path(root) if root is not None else cache_root() / "quant"
        self._key = digest("quant", capture_key, settings.to_dict(), settings.block_size)
        self._layers = sorted({c.layer for c in adapter.components})
        self._loaded: dict[tuple[int, int], dict[str, QuantizedTensor]] = {}
        self.loss: dict[tuple[str, int], float] = {}
        self.rtn_fallback: set[str] = set()
        self.computed = 0  # entries quantized by this object (0 on a full cache hit)

    def path(self, layer: int, bits: int) -> Path:
        return self.root / self._key / f"layer{layer}-{bits}bit.safetensors"

    def fill(self, bits: tuple[int, ...] = BITS, progress: bool = True) -> None:
        """Quantize whatever is missing, so every (component, bits) is on disk."""
        todo = [(layer, b) for layer in self._layers for b in bits]
        for layer, b in tqdm(todo, desc="quant cache", unit="entry", disable=not progress):
            self._entry(layer, b)

    def get(self, key: str, bits: int) -> QuantizedTensor:
        return self._entry(self.adapter.component(key).layer, bits)[key]

    def weight(self, key: str, bits: int) -> torch.Tensor:
        """The dequantized ``[out, in]`` weight of ``key`` at ``bits``."""
        return self.get(key, bits).dequantize()

    def _entry(self, layer: int, bits: int) -> dict[str, QuantizedTensor]:
        if (layer, bits) in self._loaded:
            return self._loaded[(layer, bits)]
        path = self.path(layer, bits)
        entry = None
        if path.is_file():
            try:
                entry = self._read(path, bits)
            except Exception:  # truncated or corrupt: quantize again and overwrite
                entry = None
        if entry is None:
            entry = self._compute(layer, bits, path)
        self._loaded[(layer, bits)] = entry
        return entry

    def _compute(self, layer: int, bits: int, path: Path) -> dict[str, QuantizedTensor]:
        keys = {c.key: bits for c in self.adapter.components if c.layer == layer}
        q = quantize_components(self.adapter, self.capture, keys, self.settings)
        tensors, meta = {}, {}
        for key, t in q.tensors.items():
            tensors[f"{key}/codes"] = t.codes.contiguous()
            tensors[f"{key}/scales"] = t.scales.contiguous()
            tensors[f"{key}/zeros"] = t.zeros.contiguous()
            meta[key] = {"group_size": t.group_size, "loss": q.loss[key], "rtn": key in q.rtn_fallback}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"index": json.dumps(meta)}))
        self.computed += 1
        return self._read(path, bits)

    def _read(self, path: Path, bits: int) -> dict[str, QuantizedTensor]:
        blob = Path(path).read_bytes()  # bytes, not a memory map: a damaged file raises instead of faulting
        tensors = load(blob)
        meta = json.loads(_metadata(blob)["index"])
        entry = {}
        for key, m in meta.items():
            entry[key] = QuantizedTensor(tensors[f"{key}/codes"], tensors[f"{key}/scales"], tensors[f"{key}/zeros"],
                                         bits, m["group_size"])
            self.loss[(key, bits)] = m["loss"]
            if m["rtn"]:
                self.rtn_fallback.add(key)
        return entry
