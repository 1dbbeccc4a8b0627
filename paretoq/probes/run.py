"""``paretoq probe``: capture, features, and the three files a user reads."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from paretoq.cache import (atomic_write, atomic_write_text, cache_root, check_writable_dir, digest, load_entry,
                           read_checked_json, write_checked_json)
from paretoq.calibrate import prepare
from paretoq.capture import DEFAULT_BATCH_SIZE, DEFAULT_BLOCK_SAMPLES
from paretoq.data import DEFAULT_CALIB_TOKENS, DEFAULT_EVAL_TOKENS, DEFAULT_SEQ_LEN, load_token_sets, read_documents
from paretoq.probes import cosine
from paretoq.probes.features import Features, compute_features
from paretoq.probes.plot import plot_features
from paretoq.probes.significance import ALPHA
from paretoq.walk import open_model


@dataclass(frozen=True)
class ProbeResult:
    features: Features
    files: dict[str, Path]
    capture_cached: bool
    features_cached: bool
    seconds: float


def probe(
    model: str = "demo",
    calib: str = "demo",
    out: str | Path = "probes",
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    alpha: float = ALPHA,
    batch_size: int = DEFAULT_BATCH_SIZE,
    block_samples: int = DEFAULT_BLOCK_SAMPLES,
    dtype: str | None = None,
    device: str = "cpu",
    max_memory: str | int | None = None,
    use_cache: bool = True,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> ProbeResult:
    """Probe ``model`` on ``calib`` and write ``features.json``, ``features.csv`` and ``probes.png`` to ``out``.

    The calibration windows are the ones every later stage uses for the same text and settings
    (``eval_tokens`` is needed only to keep the evaluation windows out of them).
    """
    started = time.time()
    docs = read_documents(calib)  # a bad text file fails before minutes of model loading
    check_writable_dir(Path(out))
    sm = open_model(model, dtype=dtype, device=device, max_memory=max_memory, trust_remote_code=trust_remote_code)
    sets = load_token_sets(sm.loaded.tokenizer, calib, calib_tokens, eval_tokens, seq_len, seed, documents=docs)
    prep = prepare(sm, sets.calib, {}, seed=seed, block_samples=block_samples, batch_size=batch_size, alpha=alpha,
                   use_cache=use_cache, progress=progress)
    features = prep.features
    feats_cached = cap_cached = not prep.walked
    out = Path(out)
    files = {"json": out / "features.json", "csv": out / "features.csv", "png": out / "probes.png"}
    atomic_write_text(files["json"], json.dumps(features.to_dict(), indent=1) + "\n")
    atomic_write_text(files["csv"], features.to_csv())
    atomic_write(files["png"], lambda tmp: plot_features(features, tmp))
    return ProbeResult(features, files, cap_cached, feats_cached, time.time() - started)


def features_cache_path(cap_key: str, alpha: float, seed: int) -> Path:
    """Where the features of a capture are cached, keyed by every setting they depend on."""
    settings = [alpha, seed, cosine.HIDDEN, cosine.STEPS, cosine.LR, cosine.WEIGHT_DECAY, cosine.HOLDOUT]
    return cache_root() / "features" / f"{digest('features', cap_key, settings)}.json"


def cached_features(loaded, cap, cap_key: str, alpha: float = ALPHA, seed: int = 0, use_cache: bool = True) -> Features:
    """The probe features of a capture, from the cache or computed (and cached)."""
    path = features_cache_path(cap_key, alpha, seed)
    raw = load_entry(path, read_checked_json, "features") if use_cache else None
    if raw is not None:
        return Features.from_dict(raw)
    features = compute_features(loaded.adapter, cap, alpha=alpha, seed=seed)
    features.meta.update(model=str(loaded.name_or_path), model_type=loaded.model.config.model_type)
    if use_cache:
        write_checked_json(path, features.to_dict())
    return features


def format_summary(result: ProbeResult) -> str:
    f = result.features
    lines = [f"{'layer':>5s} {'usage max/min':>13s} {'S_E Jenks high experts':>24s} {'block score':>11s} {'R^2':>6s}"]
    experts = [c for c in f.components if c.kind == "expert" and c.proj == "gate_proj"]
    for layer in sorted(f.blocks):
        usage = [c.usage for c in experts if c.layer == layer]
        ratio = f"{max(usage) / max(min(usage), 1e-12):.2f}" if usage else "-"
        high = ",".join(map(str, f.jenks[layer]["high"])) if layer in f.jenks else "-"
        b = f.blocks[layer]
        lines.append(f"{layer:5d} {ratio:>13s} {high:>24s} {b.score:11.4f} {b.r2:6.2f}")
    cached = "from cache" if result.features_cached else (
        "capture from cache" if result.capture_cached else "capture computed")
    lines.append(f"wrote {', '.join(str(p) for p in result.files.values())} ({cached}, {result.seconds:.1f} s)")
    return "\n".join(lines)
