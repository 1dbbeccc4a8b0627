"""``probes.png``: one heatmap per feature over MoE layers x experts, plus the block scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from paretoq.probes.features import Features

# Annotating every cell stops being readable beyond this many cells per heatmap.
MAX_ANNOTATED_CELLS = 160


def _grid(features: Features, field: str, proj: str | None = None) -> tuple[list[int], np.ndarray]:
    experts = [c for c in features.components if c.kind == "expert" and (proj is None or c.proj == proj)]
    layers = sorted({c.layer for c in experts})
    E = max(c.expert for c in experts) + 1
    grid = np.full((len(layers), E), np.nan)
    for c in experts:
        grid[layers.index(c.layer), c.expert] = getattr(c, field)
    return layers, grid


def _heatmap(ax, grid, layers, title, cmap, fmt, marks=None):
    im = ax.imshow(grid, aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    if grid.shape[1] <= 32:
        ax.set_xticks(range(grid.shape[1]))
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if grid.size <= MAX_ANNOTATED_CELLS:
        for (i, j), v in np.ndenumerate(grid):
            if np.isnan(v):
                continue
            r, g, b, _ = im.cmap(im.norm(v))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # perceived luminance of the cell
            text = fmt.format(v) + ("*" if marks is not None and marks[i, j] else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")


def plot_features(features: Features, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_experts = any(c.kind == "expert" for c in features.components)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), constrained_layout=True)
    model = features.meta.get("model", "")
    fig.suptitle(f"paretoq probes: {model} ({features.meta.get('num_tokens', 0):,} calibration tokens)")
    if has_experts:
        layers, usage = _grid(features, "usage", "gate_proj")
        _heatmap(axes[0, 0], usage, layers, "usage: share of routed slots", "viridis", "{:.2f}")
        _, sig = _grid(features, "significance", "gate_proj")
        marks = np.zeros_like(sig, dtype=bool)
        for i, layer in enumerate(layers):
            for e in features.jenks.get(layer, {}).get("high", []):
                marks[i, e] = True
        _heatmap(axes[0, 1], sig, layers, "significance S_E (MoQa; * = Jenks high class)", "magma", "{:.2f}", marks)
        for ax, proj in zip((axes[1, 0], axes[1, 1], axes[1, 2]), ("gate_proj", "up_proj", "down_proj")):
            _, grid = _grid(features, "outlier", proj)
            _heatmap(ax, grid, layers, f"outlier score: {proj}", "inferno", "{:.1f}")
    else:
        for ax in (axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1], axes[1, 2]):
            ax.axis("off")
        axes[0, 0].text(0.5, 0.5, "dense model: no routed experts", ha="center", va="center")
    ax = axes[0, 2]
    blocks = [features.blocks[k] for k in sorted(features.blocks)]
    x = np.arange(len(blocks))
    ax.bar(x - 0.2, [b.measured for b in blocks], 0.4, label="measured cos(in, out)", color="#999999")
    ax.bar(x + 0.2, [b.score for b in blocks], 0.4, label="predicted (block score)", color="#d95f02")
    for xi, b in zip(x, blocks):
        ax.text(xi, b.score, f"R²={b.r2:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [str(b.layer) for b in blocks])
    lo = min(min(b.measured for b in blocks), min(b.score for b in blocks)) if blocks else 0
    ax.set_ylim(max(-1.0, lo - 0.1), 1.02)
    ax.set_xlabel("layer (MLP sublayer)")
    ax.set_title("block score: high = changes the residual stream less", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
