"""On-disk caches and atomic writes.

Entries live under ``$PARETOQ_CACHE`` (default ``~/.cache/paretoq``), keyed by a hash of
everything the result depends on. Every file is written to a temporary name in the same directory
and renamed into place, so a reader never sees half a file and a killed process leaves none.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from paretoq.errors import ParetoqError

# Bumped when what is cached changes meaning, so stale entries are never read.
CACHE_VERSION = 2  # 2: quant cache codes packed; references and captures per layer/batch
_HEADER_LIMIT = 100 << 20  # safetensors caps its header at 100 MB


def cache_root() -> Path:
    return Path(os.environ.get("PARETOQ_CACHE", Path.home() / ".cache" / "paretoq")).expanduser()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; when the block succeeds it is renamed to ``out``.

    ``out`` must be new or empty: a directory never holds half a result, and nothing is overwritten.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ParetoqError(f"--out {out} already exists and is not empty; pass a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                f.chmod(0o644)  # some writers (safetensors) create 0600 files; results are meant to be shared
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def digest(*parts) -> str:
    """A short stable hash of JSON-serialisable parts."""
    blob = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def model_fingerprint(model_dir: Path) -> str:
    """Hash of the config and, per weight file, its name, size, modification time and tensor header.

    Hashing the contents of a checkpoint (hundreds of GB for large MoEs) would take minutes on every
    run. A safetensors header lists every tensor's name, dtype, shape and byte range; a fine-tune
    with the same shapes rewrites the files, so their modification times change, and a copy that
    keeps times (``cp -p``) of another checkpoint still differs in size or header. What this misses
    is an edit in place that keeps size, header and time: pass ``--no-cache`` after such an edit.
    """
    model_dir = Path(model_dir)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if f.suffix == ".safetensors" and len(head) == 8 else 0
            h.update(fh.read(min(n, _HEADER_LIMIT)))
    return h.hexdigest()[:20]
