"""Checks on a model directory's weight files from their metadata alone, before any weight is read.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and ``data_offsets`` into the byte buffer that follows, then that buffer. A file cut
short (a partial download, a full disk) still has its header: it is caught here by comparing the
file's size with the end of the last tensor the header names, in microseconds, instead of failing
minutes later inside a load with a traceback. A sharded checkpoint's
``model.safetensors.index.json`` must name files that exist.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from paretoq.errors import ParetoqError

INDEX = "model.safetensors.index.json"
# safetensors refuses headers above 100 MB; a larger length field means the file is not safetensors.
MAX_HEADER_BYTES = 100_000_000
_FIX = "download or save the model again"


def safetensors_data_end(path: Path, fix: str = _FIX) -> int:
    """The byte offset where ``path``'s last tensor ends, from its header (no tensor data is read).
    ``fix``: how to mend the file, for the message when even the header is cut short."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ParetoqError(f"{path} is truncated ({size} bytes, no safetensors header); {fix}")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ParetoqError(f"{path} is truncated or not safetensors (header of {n:,} bytes in a file of {size:,}); "
                               f"{fix}")
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError):
            raise ParetoqError(f"{path} has a corrupt safetensors header; {fix}") from None
    return 8 + n + max(ends, default=0)


def check_weight_files(model_dir: Path) -> None:
    """Raise a one-line ParetoqError when ``model_dir`` has no weights, a truncated safetensors
    file, or a shard index naming a missing file. Reads headers only."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
            raise ParetoqError(f"{index} is not a valid shard index (no \"weight_map\" object); {_FIX}") from None
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ParetoqError(f"{index.name} in {model_dir} names {missing[0]!r}{more}, which is missing; "
                               f"fetch every shard of the model")
        files = [model_dir / s for s in shards]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        if any(model_dir.glob("*.bin")):
            return  # PyTorch weights: transformers reads them with weights_only=True; no header to check
        raise ParetoqError(f"{model_dir} has a config but no weight files (*.safetensors); {_FIX}, "
                           f"or pass --model 'demo'")
    for f in files:
        if f.suffix != ".safetensors":
            continue
        end, size = safetensors_data_end(f), f.stat().st_size
        if size < end:
            raise ParetoqError(f"{f} is truncated ({size:,} of {end:,} bytes); {_FIX}")
