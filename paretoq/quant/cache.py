"""The quant cache: every component GPTQ-quantized once per bit width from the full-precision capture.

The search assembles candidates from it (a trial costs an evaluation, not a quantization). One
entry per (layer, bits) holds that layer's components: codes (packed, ``bits`` bits a weight), scales, zeros, GPTQ's loss and
whether the component fell back to round-to-nearest, as safetensors, written atomically. Entries
are keyed by the capture key (model fingerprint, calibration tokens, dtype), the quantizer
settings, the layer and the width, so a second run with the same inputs quantizes nothing and a
change of data or settings misses.

Entries are written by the calibration walk (`paretoq.calibrate`), layer by layer, or by ``fill``
from a capture held in memory. Codes are packed on disk (``bits`` bits a weight) and read lazily;
the entries held in memory (unpacked, one byte a weight) are bounded by ``max_bytes`` (default
2 GiB, at least one entry; least recently used goes first), so memory is bounded by a few layers'
codes, not by the model. GPTQ's losses are read from the entries' headers alone.
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path

import torch
from tqdm import tqdm

from paretoq.cache import cache_root, digest, load_checked_entry, load_entry, save_checked_tensors
from paretoq.capture import Capture
from paretoq.models import Adapter
from paretoq.quant.apply import quantize_components, quantize_outer
from paretoq.quant.pack import pack, unpack
from paretoq.quant.ggml import LAYOUT as GGML_LAYOUT
from paretoq.quant.quantizer import BITS, GGMLTensor, QuantizedTensor, QuantSettings


# Bytes of entries held in memory (codes unpacked to one byte a weight, plus scales and zeros): a
# small model's whole cache, so trials never read the disk; about one layer at every width of
# Qwen3-30B-A3B (623M weights a layer), so evaluating a plan layer by layer reads each entry once.
DEFAULT_MAX_BYTES = 2 << 30


def packed_entry(q, bits: int) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """A `QuantizedComponents` at ``bits`` as a cache entry's tensors (codes packed to bits/8 bytes
    a weight) and metadata."""
    tensors, meta = {}, {}
    for key, t in q.tensors.items():
        loss = q.loss[key]
        if isinstance(t, GGMLTensor):  # already the bytes a GGUF holds
            tensors[f"{key}/ggml"] = t.data.contiguous().cpu()
            meta[key] = {"ggml": t.ggml_type, "loss": None if loss != loss else loss, "rtn": key in q.rtn_fallback,
                         "tokens": q.tokens.get(key, 0), **({"split": list(t.split)} if t.split else {})}
            continue
        tensors[f"{key}/codes"] = pack(t.codes.cpu(), bits)
        tensors[f"{key}/scales"] = t.scales.contiguous().cpu()
        tensors[f"{key}/zeros"] = t.zeros.contiguous().cpu()
        meta[key] = {"group_size": t.group_size, "loss": None if loss != loss else loss, "rtn": key in q.rtn_fallback,
                     "in": int(t.codes.shape[-1]), "tokens": q.tokens.get(key, 0)}
    return tensors, meta


def merge_packed(into: tuple[dict, dict] | None, part: tuple[dict, dict]) -> tuple[dict, dict]:
    if into is None:
        return part
    into[0].update(part[0])
    into[1].update(part[1])
    return into


def _nbytes(entry: dict[str, QuantizedTensor | GGMLTensor]) -> int:
    return sum(t.data.nbytes if isinstance(t, GGMLTensor) else t.codes.nbytes + t.scales.nbytes + t.zeros.nbytes
               for t in entry.values())


class QuantCache:
    def __init__(self, adapter: Adapter, capture: Capture | None, capture_key: str, settings: QuantSettings,
                 root: Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.adapter = adapter
        self.capture = capture  # None: entries come from the calibration walk (``write``)
        self.settings = settings
        self.root = Path(root) if root is not None else cache_root() / "quant"
        # ggml entries: also what they hold for DeepSeek's kv_b_proj (paretoq.quant.ggml.LAYOUT)
        layout = (GGML_LAYOUT,) if settings.method == "ggml" else ()
        self._key = digest("quant", capture_key, settings.to_dict(), settings.block_size, *layout)
        self._layers = sorted({c.layer for c in adapter.components})
        self._loaded: OrderedDict[tuple[int, int], dict[str, QuantizedTensor]] = OrderedDict()
        self.max_bytes = max_bytes
        self._held = 0
        self.loss: dict[tuple[str, int], float] = {}
        self.rtn_fallback: set[str] = set()
        self.computed = 0  # entries quantized by this object (0 on a full cache hit)

    def path(self, layer: int, bits: int) -> Path:
        outer = {c.layer: c.kind for c in self.adapter.outer}
        return self.root / self._key / f"{outer.get(layer, f'layer{layer}')}-{bits}bit.safetensors"

    def fill_outer(self, keys, bits: tuple[int, ...]) -> None:
        """The entries of the token embedding and output head among ``keys`` at ``bits``: quantized
        from the weights held with the model when missing (no walk: no importance is used), and
        their losses noted."""
        for c in self.adapter.outer:
            if c.key in keys:
                for b in bits:
                    self._entry(c.layer, b)

    def fill(self, bits: tuple[int, ...] = BITS, progress: bool = True) -> None:
        """Quantize whatever is missing, so every (component, bits) is on disk."""
        todo = [(layer, b) for layer in self._layers for b in bits]
        for layer, b in tqdm(todo, desc="quant cache", unit="entry", disable=not progress):
            self._entry(layer, b)

    def has(self, layer: int, bits: int, verify: bool = False) -> bool:
        """Whether the entry is on disk and its header reads; ``verify`` also checks its data against
        its checksum (a damaged entry is deleted, said in one line, and counts as missing)."""
        path = self.path(layer, bits)
        if not path.is_file():
            return False
        if verify:
            return load_entry(path, load_checked_entry, "quant") is not None
        try:
            self._read_losses(path, bits)
            return True
        except Exception:
            return False

    def missing(self, bits: tuple[int, ...], verify: bool = True) -> list[tuple[int, int]]:
        """The (layer, width) entries absent or damaged. Verifying reads every entry once (at disk
        speed: the packed cache is ``sum(bits)/8`` bytes a weight), so a damaged one is recomputed
        by the walk instead of failing a trial later."""
        return [(layer, b) for layer in self._layers for b in bits if not self.has(layer, b, verify)]

    def load_losses(self, bits: tuple[int, ...]) -> None:
        """GPTQ's loss of every component at each width into ``loss``, from the entries' headers."""
        for layer in self._layers:
            for b in bits:
                self._read_losses(self.path(layer, b), b)

    def write(self, layer: int, bits: int, q) -> None:
        """Store the layer's quantized components at ``bits`` (a `QuantizedComponents`)."""
        self.write_packed(layer, bits, packed_entry(q, bits))

    def write_packed(self, layer: int, bits: int, entry: tuple[dict, dict]) -> None:
        """Store a layer's entry from `packed_entry` parts merged with `merge_packed` (a layer
        quantized in several capture passes)."""
        tensors, meta = entry
        save_checked_tensors(self.path(layer, bits), tensors, metadata={"index": json.dumps(meta)})
        self.computed += 1
        self._note(meta, bits)

    def _note(self, meta: dict, bits: int) -> None:
        for key, m in meta.items():
            self.loss[(key, bits)] = float("nan") if m["loss"] is None else m["loss"]
            if m["rtn"]:
                self.rtn_fallback.add(key)

    def get(self, key: str, bits: int) -> QuantizedTensor:
        return self._entry(self.adapter.component(key).layer, bits)[key]

    def weight(self, key: str, bits: int) -> torch.Tensor:
        """The dequantized ``[out, in]`` weight of ``key`` at ``bits``."""
        return self.get(key, bits).dequantize()

    def _entry(self, layer: int, bits: int) -> dict[str, QuantizedTensor]:
        if (layer, bits) in self._loaded:
            self._loaded.move_to_end((layer, bits))
            return self._loaded[(layer, bits)]
        path = self.path(layer, bits)
        entry = None
        if path.is_file():
            try:
                entry = self._read(path, bits)
            except Exception as exc:  # truncated or corrupt: quantize again and overwrite
                print(f"paretoq: warning: quant cache entry {path} is damaged ({exc}); recomputing it",
                      file=sys.stderr)
                path.unlink(missing_ok=True)
                entry = None
        if entry is None:
            if self.capture is None and layer in self._layers:
                raise RuntimeError(f"quant cache entry layer {layer} at {bits} bits is missing or damaged; "
                                   f"run the calibration walk to (re)write it")
            entry = self._compute(layer, bits, path)
        self._loaded[(layer, bits)] = entry
        self._held += _nbytes(entry)
        while self._held > self.max_bytes and len(self._loaded) > 1:
            _, old = self._loaded.popitem(last=False)
            self._held -= _nbytes(old)
        return entry

    def _compute(self, layer: int, bits: int, path: Path) -> dict[str, QuantizedTensor]:
        outer = {c.key: bits for c in self.adapter.outer if c.layer == layer}
        if outer:
            self.write(layer, bits, quantize_outer(self.adapter, outer, self.settings))
            return self._read(path, bits)
        keys = {c.key: bits for c in self.adapter.components if c.layer == layer}
        self.write(layer, bits, quantize_components(self.adapter, self.capture, keys, self.settings))
        return self._read(path, bits)

    def _read_losses(self, path: Path, bits: int) -> None:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        self._note(json.loads(header["__metadata__"]["index"]), bits)

    def _read(self, path: Path, bits: int) -> dict[str, QuantizedTensor]:
        tensors, metadata = load_checked_entry(path)  # a damaged entry raises CorruptEntry
        meta = json.loads(metadata["index"])
        entry = {}
        for key, m in meta.items():
            if "ggml" in m:
                entry[key] = GGMLTensor(tensors[f"{key}/ggml"], m["ggml"], bits, tuple(m.get("split", ())))
                continue
            codes = unpack(tensors[f"{key}/codes"], bits, m["in"])
            entry[key] = QuantizedTensor(codes, tensors[f"{key}/scales"], tensors[f"{key}/zeros"], bits,
                                         m["group_size"])
        self._note(meta, bits)
        return entry
