"""llama.cpp's importance matrix, from paretoq's own calibration walk.

``llama-quantize --imatrix FILE`` weights each input column's rounding error by the mean square of
the activations that column sees (``tools/quantize/quantize.cpp``: ``in_sum2 / counts``); the i-quants
need it and the K-quants use it when given. llama.cpp's ``llama-imatrix`` writes it as a GGUF
(``tools/imatrix/imatrix.cpp``): ``general.type = "imatrix"``, ``imatrix.datasets``,
``imatrix.chunk_count`` and ``imatrix.chunk_size``, and for each weight tensor ``NAME.in_sum2`` (F32,
one row of input-column sums of x^2 per expert, one row for a non-expert tensor) and ``NAME.counts``
(F32, the tokens each row summed). Routed experts see only the tokens routed to them; an expert that
saw none has count 0, which llama-quantize reads as "no information" (uniform weights).

The sums are the diagonals of the Hessians ``sum x x^T`` that paretoq's calibration already
accumulates (`paretoq.capture`), over the same tokens and with the same routing, so the file is
what llama-imatrix would compute on those tokens up to floating-point order. Not written: the
token embedding (not a matrix product) and the output matrix (its input is not captured), and
DeepSeek's split ``attn_k_b``/``attn_v_b`` (their inputs are not ``kv_b_proj``'s); llama-quantize
quantizes a tensor without an entry as it would without an imatrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from paretoq.cache import atomic_write
from paretoq.capture import DEFAULT_BATCH_SIZE, block_positions, in_pass, layer_captures
from paretoq.errors import ParetoqError
from paretoq.export.llamacpp import GGUF_ARCH, gguf_names
from paretoq.models import Adapter, Component

SUM, COUNT = ".in_sum2", ".counts"
FILE = "imatrix.gguf"  # its name in an export directory


@dataclass
class Imatrix:
    """GGUF weight name -> (sums of x^2, [rows, in] float32; tokens per row, [rows] float32)."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def mean_square(self, name: str) -> np.ndarray:
        """What llama-quantize weights ``name``'s columns by: sums / counts, and 1 where a row saw no token."""
        s, n = self.sums[name], self.counts[name][:, None]
        return np.where(n > 0, s / np.maximum(n, 1), 1.0).astype(np.float32)


def tensor_name(c: Component) -> str:
    """The GGUF weight ``c`` is a row block of (its first name: ``attn_kv_b`` for DeepSeek's kv_b_proj)."""
    return f"{gguf_names(c)[0]}.weight"


def _row_map(adapter: Adapter):
    """``c -> (rows of c's entry, c's row)``: one row per expert of a stacked expert tensor."""
    experts = {b.layer: b.num_experts for b in adapter.moe_blocks}
    return lambda c: (experts[c.layer], c.expert) if c.kind == "expert" else (1, 0)


def add_layer(im: Imatrix, adapter: Adapter, cap, components: list[Component]) -> None:
    """Record ``components``' input sums of squares and token counts from one capture pass."""
    rows_of = _row_map(adapter)
    for c in components:
        name = tensor_name(c)
        rows, row = rows_of(c)
        width = c.shape[1]
        sums = im.sums.setdefault(name, np.zeros((rows, width), np.float32))
        counts = im.counts.setdefault(name, np.zeros(rows, np.float32))
        H = cap.hessians.get(cap.site.get(c.key, ""))
        if H is not None:  # none: a routed expert no calibration token reached
            sums[row] = H.diagonal().float().cpu().numpy()
        counts[row] = cap.tokens.get(c.key, 0)


def collect(sm, calib, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True) -> Imatrix:
    """One walk over the layers of the streamed model ``sm`` with the calibration windows ``calib``
    (a `paretoq.data.TokenSet`): every component's Hessian diagonal and token count."""
    adapter = sm.adapter
    ids = calib.input_ids
    im = Imatrix(datasets=[str(calib.source)], chunk_count=int(ids.shape[0]), chunk_size=int(ids.shape[1]))
    hidden = sm.embed(ids, batch_size)
    shapes = [tuple(ids[s : s + batch_size].shape) for s in range(0, ids.shape[0], batch_size)]
    positions = block_positions(ids.numel(), 0, 0)
    for i in tqdm(range(sm.num_layers), desc="imatrix walk", unit="layer", disable=not progress):
        mine = [c for c in adapter.components if c.layer == i]
        with sm.layer(i) as layer:
            for cap, chunk, first in layer_captures(sm, i, layer, hidden, shapes, positions, ids.flatten(),
                                                    update=True):
                add_layer(im, adapter, cap, [c for c in mine if in_pass(c, chunk, first)])
                del cap
    return im


def write(path: str | Path, im: Imatrix, arch: str) -> Path:
    """``path`` as llama.cpp's GGUF imatrix, atomically."""
    from gguf import GGUFWriter

    path = Path(path)

    def put(tmp: Path) -> None:
        w = GGUFWriter(tmp, arch)
        w.add_string("general.type", "imatrix")
        w.add_array("imatrix.datasets", im.datasets)
        w.add_uint32("imatrix.chunk_count", im.chunk_count)
        w.add_uint32("imatrix.chunk_size", im.chunk_size)
        for name in sorted(im.sums):
            w.add_tensor(name + SUM, np.ascontiguousarray(im.sums[name], np.float32))
            w.add_tensor(name + COUNT, np.ascontiguousarray(im.counts[name][:, None], np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, put)
    return path


def read(path: str | Path) -> Imatrix:
    """A GGUF imatrix (llama-imatrix's or ours). A file that is not one fails with a one-line error."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ParetoqError(f"imatrix {path} does not exist; write one with `paretoq imatrix --out {path.name}`")
    try:
        r = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError, struct errors, IndexError on damage
        raise ParetoqError(f"{path} is not a readable GGUF imatrix ({e.__class__.__name__}: {e}); "
                           "write it again with `paretoq imatrix`") from None
    kind = r.fields.get("general.type")
    if kind is None or str(kind.contents()) != "imatrix":
        raise ParetoqError(f"{path} is a GGUF but not an imatrix (general.type is not 'imatrix'); "
                           "pass the file `paretoq imatrix` or llama-imatrix wrote")

    def scalar(key: str) -> int:
        f = r.fields.get(key)
        return int(f.contents()) if f is not None else 0

    datasets = r.fields.get("imatrix.datasets")
    im = Imatrix(datasets=list(datasets.contents()) if datasets is not None else [],
                 chunk_count=scalar("imatrix.chunk_count"), chunk_size=scalar("imatrix.chunk_size"))
    for t in r.tensors:
        data = np.asarray(t.data, dtype=np.float32)
        if t.name.endswith(SUM):
            im.sums[t.name[: -len(SUM)]] = data.reshape(-1, int(t.shape[0]))
        elif t.name.endswith(COUNT):
            im.counts[t.name[: -len(COUNT)]] = data.reshape(-1)
    missing = sorted(set(im.sums) ^ set(im.counts))
    if missing:
        raise ParetoqError(f"{path} has sums without counts (or counts without sums) for {missing[0]}; "
                           "write it again with `paretoq imatrix`")
    return im


def check(path: str | Path, adapter: Adapter) -> Imatrix:
    """Read ``path`` and check that it is an imatrix of ``adapter``'s model: every entry names one of
    its GGUF weights, with its input width and expert count. Fails with a one-line error otherwise."""
    im = read(path)
    want: dict[str, tuple[int, int]] = {}
    rows_of = _row_map(adapter)
    for c in adapter.components:
        for n in gguf_names(c):
            want[f"{n}.weight"] = (rows_of(c)[0], c.shape[1])
    for name, s in im.sums.items():
        if name in want and tuple(s.shape) != want[name]:
            raise ParetoqError(f"{path}'s entry {name} is {list(s.shape)} (rows x inputs) where this model needs "
                               f"{list(want[name])}: it is an imatrix of another model; compute one for this "
                               "model with `paretoq imatrix`")
    ours = [n for n in im.sums if n in want]
    if im.sums and not ours:
        raise ParetoqError(f"{path} names none of this model's tensors (first entry {next(iter(im.sums))}): "
                           "it is an imatrix of another model; compute one with `paretoq imatrix`")
    return im


def imatrix(model: str, out: str | Path, calib: str = "demo", calib_tokens: int | None = None,
            eval_tokens: int | None = None, seq_len: int | None = None, seed: int = 0, dtype: str | None = None, device: str = "cpu",
            max_memory: str | None = None, trust_remote_code: bool = False, progress: bool = True) -> tuple[Path, Imatrix]:
    """`paretoq imatrix`: the calibration walk and the file. The windows are the ones `search` and
    `quantize` calibrate on with the same --calib, --calib-tokens, --eval-tokens, --seq-len and --seed."""
    from paretoq.data import DEFAULT_CALIB_TOKENS, DEFAULT_EVAL_TOKENS, DEFAULT_SEQ_LEN, load_token_sets, read_documents
    from paretoq.walk import open_model

    out = Path(out)
    if out.is_dir():
        raise ParetoqError(f"--out {out} is a directory; pass a file name such as {out / 'imatrix.gguf'}")
    if not out.parent.exists():
        raise ParetoqError(f"--out's directory {out.parent} does not exist; create it first")
    docs = read_documents(calib)
    sm = open_model(model, dtype=dtype, device=device, max_memory=max_memory, trust_remote_code=trust_remote_code)
    arch = GGUF_ARCH.get(sm.model.config.model_type)
    if arch is None:
        raise ParetoqError(f"llama.cpp has no known GGUF architecture for {sm.model.config.model_type}; "
                           f"an imatrix is for the architectures {', '.join(sorted(set(GGUF_ARCH.values())))}")
    sets = load_token_sets(sm.loaded.tokenizer, calib, calib_tokens or DEFAULT_CALIB_TOKENS,
                           eval_tokens or DEFAULT_EVAL_TOKENS,
                           seq_len or DEFAULT_SEQ_LEN, seed, documents=docs)
    with torch.no_grad():
        im = collect(sm, sets.calib, progress=progress)
    return write(out, im, arch), im
