"""Probe features per component, computed from one capture and the model's weights."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field, fields

from paretoq.capture import Capture
from paretoq.models import Adapter
from paretoq.probes.cosine import BlockScore, block_score
from paretoq.probes.outlier import outlier_scores
from paretoq.probes.significance import ALPHA, expert_significance, jenks_two_classes
from paretoq.probes.usage import expert_usage

FEATURES = ("usage", "outlier", "significance", "cosine")


@dataclass(frozen=True)
class ComponentFeatures:
    key: str
    kind: str
    layer: int
    expert: int | None
    proj: str
    params: int
    tokens: int  # calibration tokens the component saw
    usage: float  # experts: share of the layer's routed slots; every other kind sees every token: 1.0
    outlier: float
    significance: float | None  # MoQa S_E, routed experts only
    cosine: float | None  # block score of the component's MLP sublayer; None for attention


@dataclass
class Features:
    components: list[ComponentFeatures]
    blocks: dict[int, BlockScore]  # layer -> cosine predictor result
    jenks: dict[int, dict]  # MoE layer -> {"threshold", "high": [experts]} of S_E (MoQa Eq. 8)
    meta: dict = field(default_factory=dict)

    def by_key(self) -> dict[str, ComponentFeatures]:
        return {c.key: c for c in self.components}

    def to_dict(self) -> dict:
        return {
            "format": "paretoq.features/1",
            "meta": self.meta,
            "components": [asdict(c) for c in self.components],
            "blocks": {str(k): asdict(v) for k, v in self.blocks.items()},
            "jenks": {str(k): v for k, v in self.jenks.items()},
        }

    @classmethod
    def from_dict(cls, d: dict) -> Features:
        return cls(
            components=[ComponentFeatures(**c) for c in d["components"]],
            blocks={int(k): BlockScore(**v) for k, v in d["blocks"].items()},
            jenks={int(k): v for k, v in d["jenks"].items()},
            meta=d.get("meta", {}),
        )

    def to_csv(self) -> str:
        buf = io.StringIO()
        names = [f.name for f in fields(ComponentFeatures)]
        writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for c in self.components:
            writer.writerow({k: "" if v is None else v for k, v in asdict(c).items()})
        return buf.getvalue()


def compute_features(adapter: Adapter, capture: Capture, alpha: float = ALPHA, seed: int = 0,
                     outliers: dict[str, float] | None = None) -> Features:
    """Features of every component; ``outliers`` are the weight outlier scores when the weights are
    not in ``adapter`` (the layer walk computes them while each layer is read)."""
    outliers = outlier_scores(adapter) if outliers is None else outliers
    usage: dict[str, float] = {}
    significance: dict[str, float] = {}
    jenks: dict[int, dict] = {}
    for b in adapter.moe_blocks:
        routing = capture.routing[b.layer]
        u = expert_usage(routing.top_k_index, b.num_experts)
        S = expert_significance(capture.token_ids, routing.top_k_index, b.num_experts, alpha)
        threshold, high = jenks_two_classes(S.numpy())
        jenks[b.layer] = {"threshold": threshold, "high": [int(e) for e in high.nonzero()[0]]}
        for e in range(b.num_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                key = f"{b.experts_path}.{e}.{proj}"
                usage[key], significance[key] = float(u[e]), float(S[e])
    blocks = {layer: block_score(layer, st.inputs, st.outputs, seed) for layer, st in capture.blocks.items()}
    rows = []
    for c in adapter.components:
        block = blocks.get(c.layer)
        rows.append(ComponentFeatures(
            key=c.key, kind=c.kind, layer=c.layer, expert=c.expert, proj=c.proj, params=c.params,
            tokens=int(capture.tokens.get(c.key, 0)),
            usage=usage.get(c.key, 1.0),
            outlier=outliers[c.key],
            significance=significance.get(c.key),
            cosine=block.score if block is not None and c.kind != "attn" else None,
        ))
    return Features(rows, blocks, jenks, meta={"alpha": alpha, "num_tokens": capture.num_tokens, **capture.meta})
