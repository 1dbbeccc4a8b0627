"""On-disk caches and atomic writes.

Entries live under ``$PARETOQ_CACHE`` (default ``~/.cache/paretoq``), keyed by a hash of
everything the result depends on. Every file is written to a temporary name in the same directory
and renamed into place, so a reader never sees half a file and a killed process leaves none.

Checksummed entries. A renamed-into-place file can still be damaged later (a full disk, a bad
sector, a copy cut short, a stray edit that keeps its size), and a damaged entry must never be
trusted. Each entry therefore carries the sha256 of its payload, checked on every read:

- ``payload_checksum(data: bytes) -> str``: the hex sha256 of ``data``.
- ``write_checked(path, payload: bytes)`` / ``read_checked(path) -> bytes``: any payload, stored
  atomically behind one header line ``paretoq-sha256 <hex>``.
- ``write_checked_json(path, obj)`` / ``read_checked_json(path)``: the same for a JSON value.
- ``save_checked_tensors(path, tensors, metadata=None)`` / ``load_checked_tensors(path)``: a real
  safetensors file whose ``__metadata__`` holds ``paretoq_sha256``, the sha256 of every byte
  after the header (all tensor data), so other tools still read it.
- Every ``read``/``load`` raises ``CorruptEntry`` (with the reason) when the file is cut short,
  is not in the format, has no checksum (written by an older paretoq) or does not match it.
- ``load_entry(path, read, what)``: ``read(path)``, or ``None`` when the entry is missing or
  corrupt; a corrupt entry is deleted and said in one line on stderr
  (``paretoq: warning: <what> cache entry <path> is damaged (<reason>); recomputing it``), so
  the caller recomputes and rewrites it::

      features = load_entry(path, read_checked_json, "features")
      if features is None:
          features = compute(); write_checked_json(path, features)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import sys
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


# Inside a directory being filled: who fills it, so a later run can tell a killed run's leftovers.
_OWNER = ".paretoq-owner"


def _owner_alive(tmp: Path) -> bool:
    try:
        host, pid = (tmp / _OWNER).read_text().split()
        if host != socket.gethostname():
            return True  # another machine's run on a shared disk: not ours to judge
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError):  # no owner file: made by a run that died before writing it, or an old paretoq
        return False
    return True


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` left by runs that were killed; returns them."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    stale = [p for p in out.parent.glob(f".{out.name}.*") if p.is_dir() and not _owner_alive(p)]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def check_writable_dir(out: Path, option: str = "--out") -> None:
    """Fail before any long work when ``out`` (to be created) cannot be written; leaves nothing behind."""
    out = Path(out)
    existing = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not existing.is_dir():
        reason = "Not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = "Permission denied"
    else:
        return
    raise ParetoqError(f"cannot write outputs to {out} ({reason}: {existing}); pass {option} a writable directory")


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out`` to fill; when the block succeeds it is renamed to ``out``.

    ``out`` must be new or empty: a directory never holds half a result, and nothing is overwritten.
    Temporary siblings left by killed runs are removed first, and said on stderr.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ParetoqError(f"--out {out} already exists and is not empty; pass a new directory")
    check_writable_dir(out)
    for p in remove_stale_temps(out):
        print(f"paretoq: removed {p}, a partial output left by a run that was killed", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        (tmp / _OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        yield tmp
        (tmp / _OWNER).unlink()
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


# -- checksummed entries (see the module docstring) ----------------------------------------------
_HEADER = b"paretoq-sha256 "
_TENSOR_KEY = "paretoq_sha256"


class CorruptEntry(Exception):
    """A cache entry that is cut short, malformed, or does not match its checksum: never trusted."""


def payload_checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_checked(path: Path, payload: bytes) -> None:
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(_HEADER + payload_checksum(payload).encode() + b"\n" + payload))


def read_checked(path: Path) -> bytes:
    data = Path(path).read_bytes()
    head, sep, payload = data.partition(b"\n")
    if not head.startswith(_HEADER) or not sep:
        raise CorruptEntry("no checksum header")
    if head[len(_HEADER):].decode("ascii", "replace") != payload_checksum(payload):
        raise CorruptEntry("checksum mismatch")
    return payload


def write_checked_json(path: Path, obj) -> None:
    write_checked(path, json.dumps(obj).encode())


def read_checked_json(path: Path):
    payload = read_checked(path)
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as exc:  # only reachable if written so; the checksum passed
        raise CorruptEntry(f"not JSON: {exc}") from None


def _split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header and the bytes after it (all tensor data)."""
    if len(blob) < 8:
        raise CorruptEntry("cut short")
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise CorruptEntry("cut short")
    try:
        header = json.loads(blob[8:8 + n])
    except (ValueError, UnicodeDecodeError):
        raise CorruptEntry("corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CorruptEntry("corrupt safetensors header")
    return header, blob[8 + n:]


def save_checked_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Tensors as safetensors, with the sha256 of the tensor data in the header's metadata."""
    from safetensors.torch import save

    # The metadata changes the header only: the data bytes are the same in both serialisations.
    _, body = _split_safetensors(save(tensors, metadata=metadata))
    blob = save(tensors, metadata={**(metadata or {}), _TENSOR_KEY: payload_checksum(body)})
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(blob))


def load_checked_tensors(path: Path) -> dict:
    """The tensors of a file written by ``save_checked_tensors``, after checking their checksum."""
    from safetensors.torch import load

    blob = Path(path).read_bytes()
    header, body = _split_safetensors(blob)
    expected = (header.get("__metadata__") or {}).get(_TENSOR_KEY)
    if expected is None:
        raise CorruptEntry("no checksum in its metadata")
    if expected != payload_checksum(body):
        raise CorruptEntry("checksum mismatch")
    try:
        return load(blob)
    except Exception as exc:  # noqa: BLE001  a header safetensors itself refuses
        raise CorruptEntry(f"unreadable safetensors: {type(exc).__name__}") from None


def load_checked_entry(path: Path) -> tuple[dict, dict[str, str]]:
    """Like ``load_checked_tensors``, with the header's metadata beside the tensors."""
    tensors = load_checked_tensors(path)
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return tensors, json.loads(fh.read(n)).get("__metadata__") or {}


def load_entry(path: Path, read: Callable[[Path], object], what: str):
    """``read(path)``, or None when the entry is missing or corrupt (then deleted, and said in one line)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return read(path)
    except CorruptEntry as exc:
        print(f"paretoq: warning: {what} cache entry {path} is damaged ({exc}); recomputing it", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None
