"""llama.cpp's quantizers, called as ggml itself runs them: ``ggml_quantize_chunk`` from ggml's
library (the ``ggml-python`` package builds it; extra ``llamacpp``), dequantized by ``gguf``'s own
dequantizers. What a llama.cpp target measures is then what ``llama-quantize`` writes: the same
code on the same float32 rows, with the same importance weights, gives the same bytes
(``studies/llamacpp/ggml_bytes.py`` compares them tensor by tensor).

A type's size is its block's: ``type_size`` bytes for ``block_size`` weights (gguf's
``GGML_QUANT_SIZES``), so q4_k is 144 bytes per 256 weights = 4.5 bits per weight, scales included.
K-quants and i-quants need rows that are a multiple of 256 wide. For a tensor whose rows are not,
llama-quantize stores another type (``stored_type``: q4_k's rows 2880 wide become q5_0), and so
does paretoq, so that what is priced and measured is what the GGUF will hold.
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np

from paretoq.errors import ParetoqError

# The ggml types a plan may choose (ggml.h's names, as llama-quantize's tensor-type files write them).
TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0", "q4_0", "q5_0", "q5_1", "iq2_xxs", "iq2_xs", "iq2_s",
         "iq3_xxs", "iq3_s", "iq4_nl", "iq4_xs", "iq1_s", "iq1_m", "f16")

# What llama-quantize stores when a type's blocks do not tile a tensor's rows: its
# tensor_type_fallback (src/llama-quant.cpp, llama.cpp as llama-cpp-python 0.3.36 vendors it).
# A 32-block type stays; if the fallback does not tile the rows either, the tensor is stored as f16.
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
            **dict.fromkeys(("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq4_xs"), "iq4_nl")}


def _qtype(name: str):
    from gguf import GGMLQuantizationType

    if name not in TYPES:
        raise ParetoqError(f"{name!r} is not a ggml type paretoq quantizes; pass one of {', '.join(TYPES)}")
    return GGMLQuantizationType[name.upper()]


@cache
def library():
    """ggml-python's bindings (its library loaded), or a one-line error saying how to install them."""
    try:
        import ggml  # ggml-python: loads libggml-base, where the quantizers live
    except (ImportError, OSError) as e:
        raise ParetoqError(f"llama.cpp's types need ggml's quantizers, which did not load ({e}); "
                           "install them with pip install 'paretoq[llamacpp]'") from None
    return ggml


def block(name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of ggml type ``name``."""
    from gguf import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[_qtype(name)]


def bits_per_weight(name: str) -> float:
    """Bits per weight of ``name`` as a GGUF stores it, block scales included (q4_k: 4.5)."""
    size, nbytes = block(name)
    return 8 * nbytes / size


def stored_type(name: str, width: int) -> str:
    """The type llama-quantize stores rows of ``width`` columns as when asked for ``name``."""
    if width % block(name)[0] == 0:
        return name
    fallback = FALLBACK.get(name, name)
    return fallback if width % block(fallback)[0] == 0 else "f16"


# What the quant cache's ggml entries hold, in its key: entries made before DeepSeek's kv_b_proj was
# stored split (as the converter writes it) must not be read as split ones.
LAYOUT = "kv_b split into attn_k_b and attn_v_b"


def kv_b_split(c, config) -> tuple[int, int, int] | None:
    """``(heads, qk_nope_head_dim, v_head_dim)`` when llama.cpp's converter stores component ``c`` as
    two tensors: DeepSeek's ``kv_b_proj`` ``[heads x (nope + v), kv_lora_rank]`` becomes ``attn_k_b``
    ``[heads, kv_lora_rank, nope]`` (rows ``nope`` wide: K-quants fall back on DeepSeek-V3's 128) and
    ``attn_v_b`` ``[heads, v, kv_lora_rank]`` (conversion/deepseek.py). Else None."""
    if c.proj != "kv_b_proj" or not hasattr(config, "qk_nope_head_dim"):
        return None
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return heads, config.qk_nope_head_dim, config.v_head_dim


def gguf_rows(c, config) -> list[tuple[int, int]]:
    """The GGUF tensors component ``c`` is stored as, each as (rows, row width)."""
    split = kv_b_split(c, config)
    if split is None:
        return [tuple(c.shape)]
    heads, nope, v = split
    return [(heads * c.shape[1], nope), (heads * v, c.shape[1])]


def split_kv_b(W: np.ndarray, heads: int, nope: int) -> list[np.ndarray]:
    """``kv_b_proj``'s weight as the converter's ``attn_k_b`` and ``attn_v_b``, each as 2-D rows."""
    kv = W.reshape(heads, -1, W.shape[-1])
    return [np.ascontiguousarray(kv[:, :nope].swapaxes(1, 2)).reshape(-1, nope),
            np.ascontiguousarray(kv[:, nope:]).reshape(-1, W.shape[-1])]


def merge_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """``kv_b_proj``'s weight from ``attn_k_b`` ``[heads, kv_lora_rank, nope]`` and ``attn_v_b``
    ``[heads, v, kv_lora_rank]``."""
    kv = np.concatenate([k_b.swapaxes(1, 2), v_b], axis=1)
    return kv.reshape(-1, kv.shape[-1])


def row_bytes(name: str, width: int) -> int:
    size, nbytes = block(name)
    return width // size * nbytes


def fitting(width: int, types=TYPES) -> list[str]:
    """Those of ``types`` whose blocks tile a row of ``width`` columns."""
    return [t for t in types if width % block(t)[0] == 0]


def check_width(name: str, width: int, what: str = "a row") -> None:
    size, _ = block(name)
    if width % size:
        fits = fitting(width)
        raise ParetoqError(f"{what} of {width} columns cannot be stored as {name}: its blocks are {size} wide; "
                           f"choose one of {', '.join(fits) or 'none of the supported types'}")


def requires_imatrix(name: str) -> bool:
    return bool(library().ggml_quantize_requires_imatrix(int(_qtype(name))))


def quantize(W: np.ndarray, name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """``W`` ([rows, n] float) as ggml type ``name``: ``[rows, row bytes]`` uint8, the bytes a GGUF
    holds. ``imatrix``: ``[n]`` importance per column (llama-quantize's mean squares), or None.
    ``name`` must tile the rows (``stored_type`` gives the type that does, as llama-quantize picks it)."""
    ggml = library()
    t = int(_qtype(name))
    src = np.ascontiguousarray(W, dtype=np.float32)
    if src.ndim != 2:
        raise ValueError(f"quantize takes a 2-D matrix, got shape {src.shape}")
    rows, n = src.shape
    check_width(name, n)
    if imatrix is None and requires_imatrix(name):
        raise ParetoqError(f"{name} needs an importance matrix (ggml refuses it without one); "
                           "choose a K-quant or give the calibration's (paretoq imatrix)")
    imat = None
    if imatrix is not None:
        imat = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imat.shape != (n,):
            raise ValueError(f"the importance matrix has shape {imat.shape}, the rows {n} columns")
    dst = np.zeros((rows, ggml.ggml_row_size(t, n)), dtype=np.uint8)
    ggml.ggml_quantize_init(t)  # the i-quants' grids; thread-safe, done once per type
    f32 = ctypes.POINTER(ctypes.c_float)
    src_p, dst_p = src.ctypes.data_as(f32), dst.ctypes.data_as(ctypes.c_void_p)
    imat_p = imat.ctypes.data_as(f32) if imat is not None else None

    def chunk(first_rows: tuple[int, int]) -> int:  # ggml writes rows [first, first + count) at their place in dst
        first, count = first_rows
        return ggml.ggml_quantize_chunk(t, src_p, dst_p, first * n, count, n, imat_p)

    # Rows are quantized independently, so chunks of rows on threads give the same bytes (llama-quantize
    # splits its rows the same way); ctypes releases the GIL for the call.
    chunks = row_chunks(rows, n, threads())
    if len(chunks) == 1:
        written = chunk(chunks[0])
    else:
        with ThreadPoolExecutor(len(chunks)) as pool:
            written = sum(pool.map(chunk, chunks))
    assert written == dst.nbytes, (written, dst.nbytes)
    return dst


MIN_CHUNK_WEIGHTS = 1 << 18  # below this a thread costs more than it saves


def threads() -> int:
    """The threads ggml's quantizers may use: torch's intra-op threads, the rest of paretoq's compute
    (OMP_NUM_THREADS, or ``torch.set_num_threads``, sets them)."""
    import torch

    return torch.get_num_threads()


def row_chunks(rows: int, n: int, workers: int) -> list[tuple[int, int]]:
    """(first row, rows) per worker: at most ``workers`` chunks of near-equal rows, none smaller than
    ``MIN_CHUNK_WEIGHTS`` weights."""
    k = max(1, min(workers, rows * n // MIN_CHUNK_WEIGHTS, rows))
    bounds = [rows * i // k for i in range(k + 1)]
    return [(a, b - a) for a, b in zip(bounds, bounds[1:])]


DEQUANTIZE_CHUNK_BYTES = 1 << 22  # gguf's numpy dequantizers hold several arrays many times their input's size


def dequantize(data: np.ndarray, name: str) -> np.ndarray:
    """gguf's own dequantizer: ``[rows, row bytes]`` uint8 of type ``name`` -> ``[rows, n]`` float32."""
    return dequantize_rows(data, _qtype(name))


def dequantize_rows(data: np.ndarray, qtype) -> np.ndarray:
    """gguf's ``dequantize`` of a tensor of gguf type ``qtype``, a chunk of its first axis at a time
    into one float32 output: in one call a 151,936-row embedding peaks at several times its float32 size."""
    from gguf.quants import dequantize as gguf_dequantize

    step = max(1, DEQUANTIZE_CHUNK_BYTES // max(1, data[:1].nbytes))
    first = gguf_dequantize(data[:step], qtype).astype(np.float32, copy=False)
    if data.shape[0] <= step:
        return first
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=np.float32)
    out[:step] = first
    for start in range(step, data.shape[0], step):
        out[start : start + step] = gguf_dequantize(data[start : start + step], qtype)
    return out


def round_trip(W: np.ndarray, name: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """``W`` as llama.cpp will compute with it after quantizing to ``name``."""
    return dequantize(quantize(W, name, imatrix), name)
