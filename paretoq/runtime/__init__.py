"""The quantized runtime: modules that compute on packed codes (Triton on CUDA, torch elsewhere),
model patching, and greedy generation."""

from paretoq.runtime.modules import BACKENDS, QuantExperts, QuantLinear
from paretoq.runtime.patch import PatchReport, from_plan, load_runtime, pack_components, patch_model

__all__ = ["BACKENDS", "PatchReport", "QuantExperts", "QuantLinear", "from_plan", "load_runtime", "pack_components",
           "patch_model"]
