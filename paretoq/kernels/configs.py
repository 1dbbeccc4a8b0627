"""Launch configurations as data: tuned tables per GPU, read before any heuristic.

A first call never autotunes (that would cost seconds per shape in a user's first token). The
order of lookup for a (kernel, bits, M bucket, N, K) key is:

1. ``$PARETOQ_CACHE/kernels/<device>.json``, written by ``paretoq bench --tune`` on the user's GPU;
2. ``paretoq/kernels/tuned.json``, shipped with paretoq, one table per device name (H100, H200);
3. the heuristic below, which follows the kernel's design: M = 1 streams few rows per program
   with the broadcast-and-sum path and splits K until the launch fills the GPU (`decode_splits`);
   M = 2..16 pads to one 16-row tensor-core tile (same bytes, so M = 16 costs about what
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


def decode_splits(N: int, K: int, block_n: int, matrices: int, sms: int) -> int:
    """K splits for a decode launch: enough programs to fill the GPU, each split at least 4 K tiles.

    Measured on an H200 (docs/benchmarks.md, 2026-12-04): at M = 1 a program streams its rows'
    tiles one after another, so a launch of a few hundred programs leaves the SMs waiting on memory;
    the 4096-row down projection (256 row tiles) ran 1.8-2.1x faster split 4-16 ways, the
    14336-row up projection (896 row tiles) gained little. Rule: double the splits while the row
    tiles of all ``matrices`` read fill fewer than 8 programs per SM.
    """
    programs = matrices * -(-N // block_n)
    splits = 1
    while programs * splits * 2 <= 8 * sms and K // (splits * 2) >= 4 * 128:
        splits *= 2
    return splits


def heuristic(M: int, N: int, K: int, matrices: int = 1, sms: int = 132) -> dict:
    """``matrices``: weight matrices one launch reads (a MoE stage at decode: top-k x slots);
    ``sms``: the GPU's multiprocessors."""
    if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU interpreter: few, large programs run fastest
        return {"BLOCK_M": 1 if M == 1 else 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1}
    if M == 1:  # 2 warps beat 4 and 8 at every decode shape measured on the H200
        return {"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 2, "num_stages": 3,
                "SPLIT_K": decode_splits(N, K, 16, matrices, sms)}
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


@lru_cache(maxsize=None)
def _sms(name: str, device) -> int:
    if name == "cpu" or not torch.cuda.is_available():  # CPU, or configs looked up without a GPU
        return 132  # an H100's / H200's count; only the split heuristic reads it
    return torch.cuda.get_device_properties(device).multi_processor_count


def lookup(kernel: str, bits: int, M: int, N: int, K: int, device, matrices: int = 1) -> dict:
    name = device_name(device)
    found = _tables(name).get(key(kernel, bits, M, N, K)) if name != "cpu" else None
    return dict(found) if found else heuristic(M, N, K, matrices, _sms(name, device))


def qmm_config(M: int, N: int, K: int, bits: int, device) -> dict:
    return lookup("qmm", bits, M, N, K, device)


def moe_config(kernel: str, M: int, N: int, K: int, bits: int, device, matrices: int = 1) -> dict:
    """``kernel`` is ``moe_up`` or ``moe_down``; M is the number of tokens (before top-k);
    ``matrices`` the expert matrices the launch reads at most (tokens x top-k x slots)."""
    return lookup(kernel, bits, M, N, K, device, matrices)


def save_user_table(name: str, entries: dict) -> Path:
    """Merge tuned entries into the user's table for this device (atomic)."""
    path = user_table_path(name)
    table = json.loads(path.read_text()) if path.is_file() else {}
    table.update(entries)
    atomic_write_text(path, json.dumps(table, indent=1, sort_keys=True) + "\n")
    _tables.cache_clear()
    return path
