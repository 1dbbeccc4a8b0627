"""Export plans to other quantizers, and the limits of the engines that load them.

One module per format (``gptqmodel``, ``llmcompressor``, ``llamacpp``, ``exl3``, ``flat``), the
targets and their limits in ``targets``, coarsening in ``collapse``, and ``export()`` in ``run``.
"""

from paretoq.export.collapse import collapse
from paretoq.export.run import FORMATS, ExportResult, export
from paretoq.export.targets import TARGETS, Target, check_servable, get_target, target_space

__all__ = ["FORMATS", "TARGETS", "ExportResult", "Target", "check_servable", "collapse", "export", "get_target",
           "target_space"]
