"""Export plans to other quantizers, and the limits of the engines that load them.

One module per format (``gptqmodel``, ``llmcompressor``, ``llamacpp``, ``exl3``, ``flat``), the
targets and their limits in ``targets``, coarsening in ``collapse``, and ``export()`` in ``run``.

The names below are imported on first use: the CLI reads the targets' names when it starts, and
must not pay for torch and transformers to answer ``--help`` or a bad argument.
"""

import importlib

_WHERE = {"FORMATS": "run", "ExportResult": "run", "export": "run", "TARGETS": "targets", "Target": "targets",
          "check_servable": "targets", "get_target": "targets", "target_space": "targets"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"paretoq.export.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'paretoq.export' has no attribute {name!r}")
