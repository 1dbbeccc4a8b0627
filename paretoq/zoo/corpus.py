"""The demo model's corpus: the Python standard library's own source, which every machine has offline.

Files are split into training and held-out by a hash of their path relative to the stdlib root, so
the split is the same on every Python version. The held-out text that paretoq uses for calibration
and evaluation is shipped in the package (``demo/heldout.jsonl``), so results never depend on the
user's Python version; only ``paretoq zoo train`` reads the local stdlib.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path

# One file in 16 is held out: enough text for calibration and evaluation many times over.
HELDOUT_MODULUS = 16
# Cap on held-out text shipped in the package (characters), to keep the wheel small.
HELDOUT_SHIPPED_CHARS = 400_000
# Generated tables and data dumps teach little about code and dominate by size.
MAX_FILE_BYTES = 200_000
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib2to3", "idle_test"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str) -> bool:
    digest = hashlib.sha256(relpath.encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELDOUT_MODULUS == 0


def stdlib_files(root: Path | None = None) -> Iterator[tuple[str, str]]:
    """Yield (relative path, source text) for every readable .py file of the stdlib, sorted."""
    root = root or stdlib_root()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if _SKIPPED_DIRS.intersection(rel.split("/")[:-1]):
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield rel, text


def split_stdlib(root: Path | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Return (train, heldout) lists of (relative path, text)."""
    train, heldout = [], []
    for rel, text in stdlib_files(root):
        (heldout if is_heldout(rel) else train).append((rel, text))
    return train, heldout


def shipped_heldout(heldout: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The prefix of the held-out files (in hash order, so the choice is stable) that ships."""
    ordered = sorted(heldout, key=lambda item: hashlib.sha256(item[0].encode()).hexdigest())
    shipped, total = [], 0
    for rel, text in ordered:
        if total + len(text) > HELDOUT_SHIPPED_CHARS:
            continue
        shipped.append((rel, text))
        total += len(text)
    return shipped
