"""Launch configurations as data: tuned tables per GPU, read before any heuristic.

A first call never autotunes (that would cost seconds per shape in a user's first token). The
order of lookup for a (kernel, bits, M bucket, N, K) key is:

1. ``$PARETOQ_CACHE/kernels/<device>.json``, written by ``paretoq bench --tune`` on the user's GPU;
2. ``paretoq/kernels/tuned.json``, shipped with paretoq, one table per device name (H100, H200);
3. the heuristic below, which follows the kernel's design: M = 1 streams few rows per program
   with the broadcast-and-sum path so that even the 4096-row down projection launches hundreds of
   programs; M = 2..16 pads to one 16-row tensor-core tile (same bytes, so M = 16 costs about what
   M = 1 does); prefill uses square-ish tiles.

Triton's own cache keeps the compiled binaries (``~/.triton``), so a second process starts warm too.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import torch

from paretoq.cache import atomic_write_text, cache_root

SHIPPED = Path(__file__).with_name("tuned.json")


def m_bucket(M: int) -> int:
    """Configs are keyed by the next power of two of M (1, 2, 4, ... 256, then 512 for all larger)."""
    b = 1
    while b < M and b < 512:
        b *= 2
    return b


def key(kernel: str, bits: int, M: int, N: int, K: int) -> str:
    return f"{kernel}/b{bits}/m{m_bucket(M)}/n{N}/k{K}"


def heuristic(M: int, N: int, K: int) -> dict:
    if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU interpreter: few, large programs run fastest
        return {"BLOCK_M": 1 if M == 1 else 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}
    if M == 1:
        return {"BLOCK_M": 1, "BLOCK_N": 16 if N <= 8192 else 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    if M <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    if M <= 64:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def device_name(device) -> str:
    if torch.device(device).type != "cuda":
        return "cpu"
    return torch.cuda.get_device_name(device).replace(" ", "_")


def user_table_path(name: str) -> Path:
    return cache_root() / "kernels" / f"{name}.json"


@lru_cache(maxsize=None)
def _tables(name: str) -> dict:
    table: dict = {}
    if SHIPPED.is_file():
        shipped = json.loads(SHIPPED.read_text())
        for dev, entries in shipped.get("devices", {}).items():
            if dev.lower() in name.lower():
                table.update(entries)
    user = user_table_path(name)
    if user.is_file():
        table.update(json.loads(user.read_text()))
    return table


def lookup(kernel: str, bits: int, M: int, N: int, K: int, device) -> dict:
    name = device_name(device)
    found = _tables(name).get(key(kernel, bits, M, N, K)) if name != "cpu" else None
    return dict(found) if found else heuristic(M, N, K)


def qmm_config(M: int, N: int, K: int, bits: int, device) -> dict:
    return lookup("qmm", bits, M, N, K, device)


def moe_config(kernel: str, M: int, N: int, K: int, bits: int, device) -> dict:
    """``kernel`` is ``moe_up`` or ``moe_down``; M is the number of tokens (before top-k)."""
    return lookup(kernel, bits, M, N, K, device)


def save_user_table(name: str, entries: dict) -> Path:
    """Merge tuned entries into the user's table for this device (atomic)."""
    path = user_table_path(name)
    table = json.loads(path.read_text()) if path.is_file() else {}
    table.update(entries)
    atomic_write_text(path, json.dumps(table, indent=1, sort_keys=True) + "\n")
    _tables.cache_clear()
    return path
