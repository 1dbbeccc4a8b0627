"""`paretoq export`: check a plan against a target, coarsen it if asked, and write the target's files."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from paretoq.cache import atomic_write, atomic_write_text, check_writable_dir
from paretoq.errors import ParetoqError
from paretoq.export import exl3, flat, gptqmodel, llamacpp, llmcompressor
from paretoq.export import imatrix as imatrix_file
from paretoq.export.collapse import Collapsed, collapse
from paretoq.export.common import Context, Export
from paretoq.export.targets import check_servable, get_target
from paretoq.models import load_model
from paretoq.plan import Plan

FORMATS: dict[str, Callable[[Context], Export]] = {
    "gptqmodel": gptqmodel.write, "llmcompressor": llmcompressor.write, "llamacpp": llamacpp.write,
    "exl3": exl3.write, "json": flat.write,
}
COLLAPSED_PLAN = "plan.collapsed.json"


@dataclass(frozen=True)
class ExportResult:
    out: Path
    files: list[Path]
    next: str  # the command(s) to run next
    notes: tuple[str, ...]
    collapsed: Collapsed | None
    plan: Plan  # as exported (collapsed where asked)


def export(plan: str | Path | Plan, format: str, out: str | Path | None = None, model: str | None = None,
           collapse_mode: str | None = None, ggml_types: str | None = None, imatrix: str | Path | None = None,
           trust_remote_code: bool = False) -> ExportResult:
    target = get_target(format)
    plan_path = None if isinstance(plan, Plan) else Path(plan)
    plan = plan if isinstance(plan, Plan) else Plan.load(plan_path)
    options = {"ggml_types": llamacpp.parse_types(ggml_types)} if ggml_types else {}
    out = Path(out) if out else (plan_path.parent if plan_path else Path("export")) / f"export-{target.name}"
    check_writable_dir(out)
    model = model or plan.model.get("name_or_path")
    if not model:
        raise ParetoqError("the plan names no model (\"model\": {\"name_or_path\": ...}); pass --model")
    # Shapes and names only: the model is built on the meta device, no weight is read.
    loaded = load_model(model, trust_remote_code=trust_remote_code, weights=False)
    plan.validate(loaded.adapter)
    collapsed = None
    if collapse_mode is not None:
        collapsed = collapse(plan, loaded.adapter, target, collapse_mode)
        plan = collapsed.plan
    check_servable(plan, loaded.adapter, target)
    if imatrix is not None:
        if target.format != "llamacpp":
            raise ParetoqError(f"--imatrix is for --format llamacpp (llama-quantize reads it), not {target.name}")
        imatrix_file.check(imatrix, loaded.adapter)  # of this model, before anything is written
        options["imatrix"] = imatrix_file.FILE
    ctx = Context(plan, loaded.adapter, target, loaded.model.config.model_type, str(loaded.path), options)
    result = FORMATS[target.format](ctx)
    for name, text in result.files.items():
        atomic_write_text(out / name, text)
    files = [out / name for name in result.files]
    if imatrix is not None:  # the export carries its imatrix, so its command runs from the directory alone
        atomic_write(out / imatrix_file.FILE, lambda tmp: shutil.copyfile(imatrix, tmp))
        files.append(out / imatrix_file.FILE)
    if collapsed is not None:  # the plan as exported, for `paretoq eval` or `paretoq quantize`
        plan.save(out / COLLAPSED_PLAN, loaded.adapter)
        files.append(out / COLLAPSED_PLAN)
    return ExportResult(out, files, result.next.replace("{out}", str(out)), result.notes, collapsed, plan)
