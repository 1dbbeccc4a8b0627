"""Model adapters: detect the architecture, list components, read/write a component's 2-D weight."""

from paretoq.models.adapter import (
    ADAPTERS,
    Adapter,
    Architecture,
    MoEBlock,
    expert_views,
    get_adapter,
    supported_model_types,
)
from paretoq.models.component import KINDS, OUTER_KINDS, Component
from paretoq.models.loading import DEMO, LoadedModel, demo_dir, load_model, load_tokenizer, resolve_model_dir

__all__ = [
    "ADAPTERS", "Adapter", "Architecture", "Component", "DEMO", "KINDS", "OUTER_KINDS", "LoadedModel", "MoEBlock",
    "demo_dir", "expert_views", "get_adapter", "load_model", "load_tokenizer", "resolve_model_dir",
    "supported_model_types",
]
