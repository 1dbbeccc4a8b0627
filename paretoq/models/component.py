"""What the search assigns bit widths to: one 2-D weight matrix of the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass

KINDS = ("attn", "dense", "shared", "expert", "embed", "head", "other")
# The token embedding and the output head: outside the decoder layers, quantized only by llama.cpp's
# types (a GGUF stores them like any matrix), and components of a plan only when it names them.
OUTER_KINDS = ("embed", "head")


@dataclass(frozen=True)
class Component:
    """One weight matrix that gets one bit width.

    ``key`` is the canonical per-expert ("defused") module path, e.g.
    ``model.layers.3.mlp.experts.5.gate_proj``; ``shape`` is ``(out, in)``, the orientation every
    quantizer sees, whatever the storage layout of the tensor it lives in.
    """

    key: str
    kind: str
    layer: int
    expert: int | None
    proj: str
    shape: tuple[int, int]

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["params"] = self.params
        return d
