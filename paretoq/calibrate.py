"""One pass for calibration: the layer walk that fills every cache a search, an eval or a probe needs.

Per decoder layer L, read from the shards onto the device:
- the calibration batches go through it with the capture hooks (`paretoq.capture`): its input
  Hessians, the router's choices, token counts and the block samples of the cosine predictor;
- the eval batches of every part whose reference is missing go through it without hooks;
- its components are GPTQ-quantized (on the device) at every width the quant cache lacks, from
  those full-precision Hessians, and written to the cache as that layer's entries;
- its light capture (routing, token counts, block samples and weight outlier scores; not the
  Hessians, which are freed with the layer) is stored, one file per layer;
- the layer is freed, and its outputs are layer L+1's inputs.
At the end the eval batches go through the final norm and lm_head: each part's full-precision
reference, exact, in memory when small and on disk one batch per file when not. The features
are computed from the light captures.

A second run with the same model, text and settings finds every entry and walks nothing; one
that lacks some (another width, another eval part) walks once and computes only what is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from paretoq.cache import (CorruptEntry, atomic_write_text, cache_root, digest, load_checked_entry,
                           load_checked_tensors, load_entry, model_fingerprint, read_checked_json,
                           save_checked_tensors, write_checked_json)
from paretoq.capture import (DEFAULT_BATCH_SIZE, DEFAULT_BLOCK_SAMPLES, BlockStates, Capture, Routing,
                             block_positions, capture_meta, in_pass, layer_captures)
from paretoq.data import TokenSet
from paretoq.errors import ParetoqError
from paretoq.evaluate import DEFAULT_MAX_BYTES, DiskLogprobs, Reference
from paretoq.probes.features import Features, compute_features
from paretoq.probes.outlier import outlier_scores
from paretoq.probes.significance import ALPHA
from paretoq.quant.apply import quantize_components
from paretoq.quant.cache import QuantCache, merge_packed, packed_entry
from paretoq.quant.quantizer import QuantSettings
from paretoq.walk import StreamedModel


@dataclass
class Prepared:
    """What the walk leaves for the stages after it."""

    sm: StreamedModel
    capture_key: str
    features: Features | None
    cache: QuantCache | None
    references: dict[str, Reference]
    walked: bool  # False when every entry came from the caches
    seconds: float


def capture_key(sm: StreamedModel, calib: TokenSet, block_samples: int, seed: int) -> str:
    return digest("capture", model_fingerprint(sm.loaded.path), calib.fingerprint(), str(sm.dtype), block_samples,
                  seed)


def _capture_dir(key: str) -> Path:
    return cache_root() / "captures" / key


def _reference_dir(sm: StreamedModel, part: TokenSet, batch_size: int) -> Path:
    key = digest("reference/walk", model_fingerprint(sm.loaded.path), part.fingerprint(), str(sm.dtype), batch_size)
    return cache_root() / "reference" / key


def read_reference(directory: Path, input_ids: torch.Tensor) -> Reference | None:
    """A reference written by the walk, or None when absent or damaged."""
    try:
        meta = json.loads((directory / "reference.json").read_text())
        head = load_checked_tensors(directory / "head.safetensors")
        if meta["exact_in_memory"]:
            logprobs = load_checked_tensors(directory / "logprobs.safetensors")["logprobs"]
        else:  # every batch checked once here; trials then read them without hashing
            logprobs = DiskLogprobs(directory, meta["batch_size"], input_ids.shape[0])
            for i in range(meta["batches"]):
                load_checked_tensors(logprobs.file(i))
        if not torch.equal(head["input_ids"], input_ids):
            return None
        return Reference(input_ids, meta["nll"], head["argmax"], logprobs)
    except CorruptEntry as exc:
        print(f"paretoq: warning: reference cache entry {directory} is damaged ({exc}); recomputing it",
              file=sys.stderr)
        shutil.rmtree(directory, ignore_errors=True)
        return None
    except Exception:  # missing, or from another version: computed again
        return None


class _ReferenceWriter:
    """Collects one part's fp log-probs batch by batch; small ones in memory, large ones on disk."""

    def __init__(self, directory: Path, part: TokenSet, vocab: int, batch_size: int, max_bytes: int):
        self.directory, self.part, self.batch_size = directory, part, batch_size
        ids = part.input_ids
        self.in_memory = ids.shape[0] * (ids.shape[1] - 1) * vocab * 4 <= max_bytes
        # One partial directory per process: workers started together on an empty cache each write
        # the same reference, and must not delete one another's half-written one.
        self.tmp = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.nll, self.argmax, self.kept, self.batches = 0.0, [], [], 0

    def add(self, lp: torch.Tensor, batch: torch.Tensor) -> None:
        self.nll -= lp.gather(-1, batch[:, 1:, None].to(lp.device)).sum().item()
        self.argmax.append(lp.argmax(-1).cpu())
        lp = lp.cpu().contiguous()
        if self.in_memory:
            self.kept.append(lp)
        else:
            save_checked_tensors(self.tmp / f"batch{self.batches}.safetensors", {"logprobs": lp})
        self.batches += 1

    def finish(self) -> Reference:
        ids = self.part.input_ids
        argmax = torch.cat(self.argmax)
        save_checked_tensors(self.tmp / "head.safetensors", {"input_ids": ids.contiguous(), "argmax": argmax})
        if self.in_memory:
            save_checked_tensors(self.tmp / "logprobs.safetensors", {"logprobs": torch.cat(self.kept)})
        nll = self.nll / ids[:, 1:].numel()
        (self.tmp / "reference.json").write_text(json.dumps(
            {"nll": nll, "exact_in_memory": self.in_memory, "batch_size": self.batch_size, "batches": self.batches}))
        # The whole entry appears at once. An older one (--no-cache, or damaged) is moved aside first;
        # where another process put its copy in between (same inputs, same content), that one stays.
        old = self.directory.with_name(f"{self.directory.name}.old-{os.getpid()}")
        try:
            self.directory.rename(old)
        except FileNotFoundError:
            pass
        try:
            self.tmp.rename(self.directory)
        except OSError:
            shutil.rmtree(self.tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        for _ in range(100):  # another process may be between its two renames for a moment
            ref = read_reference(self.directory, ids)
            if ref is not None:
                return ref
            time.sleep(0.1)
        raise RuntimeError(f"the fp reference {self.directory} did not read back after it was written")


def _save_light_capture(directory: Path, layer: int, cap: Capture, outliers: dict[str, float]) -> None:
    tensors = {}
    for lay, r in cap.routing.items():
        tensors[f"routing/{lay}/index"] = r.top_k_index.contiguous().cpu()
        tensors[f"routing/{lay}/weights"] = r.top_k_weights.contiguous().cpu()
    for lay, b in cap.blocks.items():
        tensors[f"block/{lay}/inputs"] = b.inputs.contiguous()
        tensors[f"block/{lay}/outputs"] = b.outputs.contiguous()
    meta = {"site": cap.site, "tokens": cap.tokens, "outliers": outliers}
    save_checked_tensors(directory / f"layer{layer}.safetensors", tensors, metadata={"index": json.dumps(meta)})


def _read_light_captures(directory: Path, layers: int) -> tuple[Capture, dict[str, float]] | None:
    """The per-layer light captures merged into one `Capture` (no Hessians), or None if any is missing."""
    try:
        token_ids = load_checked_tensors(directory / "tokens.safetensors")["token_ids"]
        meta_all = json.loads((directory / "meta.json").read_text())
        routing, blocks, site, tokens, outliers = {}, {}, {}, {}, {}
        for layer in range(layers):
            entry = load_entry(directory / f"layer{layer}.safetensors", load_checked_entry, "capture")
            if entry is None:
                return None
            tensors, metadata = entry
            meta = json.loads(metadata["index"])
            site.update(meta["site"])
            tokens.update(meta["tokens"])
            outliers.update(meta["outliers"])
            if f"routing/{layer}/index" in tensors:
                routing[layer] = Routing(tensors[f"routing/{layer}/index"], tensors[f"routing/{layer}/weights"])
            if f"block/{layer}/inputs" in tensors:
                blocks[layer] = BlockStates(tensors[f"block/{layer}/inputs"], tensors[f"block/{layer}/outputs"])
    except Exception:
        return None
    return Capture(token_ids, routing, {}, site, tokens, blocks, meta_all), outliers


def prepare(
    sm: StreamedModel,
    calib: TokenSet,
    parts: dict[str, TokenSet],
    settings: QuantSettings | None = None,
    widths: tuple[int, ...] = (),
    *,
    seed: int = 0,
    block_samples: int = DEFAULT_BLOCK_SAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    alpha: float = ALPHA,
    features: bool = True,
    max_reference_bytes: int = DEFAULT_MAX_BYTES,
    use_cache: bool = True,
    progress: bool = True,
) -> Prepared:
    """Fill what is missing of: features, the quant cache at ``widths`` under ``settings``, and the
    fp reference of each eval part, with (at most) one walk over the layers.

    ``use_cache=False`` recomputes every entry and overwrites it.
    """
    from paretoq.probes.run import features_cache_path

    started = time.time()
    adapter, n = sm.adapter, sm.num_layers
    key = capture_key(sm, calib, block_samples, seed)
    cap_dir = _capture_dir(key)
    cache = QuantCache(adapter, None, key, settings) if settings is not None and widths else None
    todo_quant = set(cache.missing(widths) if use_cache else
                     [(c, b) for c in {c.layer for c in adapter.components} for b in widths]) if cache else set()
    refs: dict[str, Reference] = {}
    ref_dirs = {name: _reference_dir(sm, part, batch_size) for name, part in parts.items()}
    for name, part in parts.items():
        r = read_reference(ref_dirs[name], part.input_ids) if use_cache else None
        if r is not None:
            refs[name] = r
    todo_refs = [name for name in parts if name not in refs]
    feats = None
    feat_path = features_cache_path(key, alpha, seed)
    raw = load_entry(feat_path, read_checked_json, "features") if features and use_cache else None
    if raw is not None:
        feats = Features.from_dict(raw)
    light = _read_light_captures(cap_dir, n) if features and feats is None and use_cache else None
    todo_capture = features and feats is None and light is None
    walked = bool(todo_quant or todo_refs or todo_capture)
    if walked:
        _check_disk(sm, todo_quant, {name: parts[name] for name in todo_refs}, settings)
        _walk(sm, calib, {name: parts[name] for name in todo_refs}, ref_dirs, cache, todo_quant, cap_dir,
              todo_capture, seed, block_samples, batch_size, max_reference_bytes, refs, progress)
        if todo_capture:
            light = _read_light_captures(cap_dir, n)
    if features and feats is None:
        assert light is not None, "the walk wrote every layer's capture"
        cap, outliers = light
        feats = compute_features(adapter, cap, alpha=alpha, seed=seed, outliers=outliers)
        feats.meta.update(model=str(sm.loaded.name_or_path), model_type=sm.model.config.model_type)
        write_checked_json(feat_path, feats.to_dict())
    if cache is not None:
        cache.load_losses(widths)
        if not sm.resident:  # streaming: hold one layer's entries at every width, never the whole model's
            cache.max_bytes = int(max(adapter.params_by_layer().values()) * entry_bytes_per_weight(settings, widths))
    return Prepared(sm, key, feats, cache, refs, walked, time.time() - started)


def entry_bytes_per_weight(settings: QuantSettings, widths: tuple[int, ...]) -> float:
    """Bytes a weight takes in the quant cache's memory at every width of ``widths``: GPTQ codes
    unpacked to a byte, plus a quarter for scales, zeros and slack; ggml types their own bytes
    (q2_k 0.33, q8_0 1.06), plus the same quarter."""
    per_width = [settings.budget_bits(b) / 8 if settings.method == "ggml" else 1.0 for b in widths]
    return sum(per_width) * 1.25


def _check_disk(sm: StreamedModel, todo_quant, ref_parts: dict[str, TokenSet], settings) -> None:
    """Refuse, before the walk, caches that the disk under the cache root cannot hold."""
    params = sm.adapter.params_by_layer()
    group = settings.group_size if settings is not None and settings.group_size > 0 else 128
    need = sum(params.get(layer, 0) * (b / 8 + 8 / group) for layer, b in todo_quant)  # codes + fp32 scale, zero
    need += sum(part.input_ids.numel() * sm.model.config.vocab_size * 4 for part in ref_parts.values())
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if need > free:
        raise ParetoqError(f"the caches need about {need / 1e9:.1f} GB under {root} but only {free / 1e9:.1f} GB "
                           f"is free; free space there or point PARETOQ_CACHE at a larger disk")


@torch.no_grad()
def _walk(sm, calib, ref_parts, ref_dirs, cache, todo_quant, cap_dir, todo_capture, seed, block_samples,
          batch_size, max_reference_bytes, refs, progress) -> None:
    adapter, n = sm.adapter, sm.num_layers
    ids = calib.input_ids
    need_hooks = bool(todo_quant) or todo_capture
    calib_shapes = [tuple(ids[s : s + batch_size].shape) for s in range(0, ids.shape[0], batch_size)]
    calib_h = sm.embed(ids, batch_size) if need_hooks else []
    eval_h = {name: sm.embed(part.input_ids, batch_size) for name, part in ref_parts.items()}
    eval_shapes = {name: [tuple(part.input_ids[s : s + batch_size].shape)
                          for s in range(0, part.input_ids.shape[0], batch_size)] for name, part in ref_parts.items()}
    positions = block_positions(ids.numel(), block_samples, seed)
    if todo_capture:
        cap_dir.mkdir(parents=True, exist_ok=True)
        save_checked_tensors(cap_dir / "tokens.safetensors", {"token_ids": ids.flatten().contiguous()})
        atomic_write_text(cap_dir / "meta.json", json.dumps(capture_meta(calib, positions, seed)))
    for i in tqdm(range(n), desc="calibration walk", unit="layer", disable=not progress):
        widths = sorted(b for (layer, b) in todo_quant if layer == i)
        with sm.layer(i) as layer:
            if need_hooks:  # a probe needs no Hessian
                keys = [c for c in adapter.components if c.layer == i]
                parts: dict[int, tuple] = {}  # width -> entry, when the experts' Hessians take several passes
                for cap, chunk, first in layer_captures(sm, i, layer, calib_h, calib_shapes, positions, ids.flatten(),
                                                        update=True, hessians=bool(widths)):
                    mine = [c.key for c in keys if in_pass(c, chunk, first)]
                    factors = {}  # each input's Hessian factored once, for every width
                    for b in widths:
                        q = quantize_components(adapter, cap, dict.fromkeys(mine, b), cache.settings, factors)
                        if chunk is None:  # the whole layer in one pass: write each width at once
                            cache.write(i, b, q)
                        else:
                            parts[b] = merge_packed(parts.get(b), packed_entry(q, b))
                        del q
                    del factors
                    if first and todo_capture:
                        _save_light_capture(cap_dir, i, cap, outlier_scores(adapter, layer=i))
                    del cap  # the Hessians go with it, before the next pass
                for b, entry in parts.items():
                    cache.write_packed(i, b, entry)
                del parts
            for name in ref_parts:
                eval_h[name] = [sm.run(i, layer, x, shape) for x, shape in zip(eval_h[name], eval_shapes[name])]
    vocab = sm.model.config.vocab_size
    for name, part in ref_parts.items():
        writer = _ReferenceWriter(ref_dirs[name], part, vocab, batch_size, max_reference_bytes)
        for j, x in enumerate(eval_h[name]):
            writer.add(sm.logprobs(x), part.input_ids[j * batch_size : (j + 1) * batch_size])
        refs[name] = writer.finish()
