"""Load a local Hugging Face model directory (never a hub download) or the bundled demo."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from paretoq.errors import ParetoqError
from paretoq.models.adapter import ADAPTERS, Adapter, get_adapter, supported_model_types
from paretoq.models.files import check_weight_files

DEMO = "demo"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None  # a transformers tokenizer, or None when the directory has none
    adapter: Adapter
    name_or_path: str  # as the user gave it ("demo" or a path)
    path: Path  # the resolved directory


def demo_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "zoo" / "demo"


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """The model directory for `name_or_path`, after checking it can be loaded without a download."""
    if str(name_or_path) == DEMO:
        path = demo_dir()
        if not (path / "config.json").is_file():
            raise ParetoqError(f"the bundled demo model is missing from {path}; reinstall paretoq")
        return path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        hint = ""
        if len(Path(name_or_path).parts) == 2 and not str(name_or_path).startswith((".", "/", "~")):
            hint = f" (paretoq never downloads: fetch it first, e.g. `hf download {name_or_path} --local-dir DIR`)"
        raise ParetoqError(
            f"model directory {str(name_or_path)!r} does not exist{hint}; pass --model a local Hugging Face "
            f"model directory or 'demo'"
        )
    if not (path / "config.json").is_file():
        raise ParetoqError(
            f"{str(path)!r} is not a Hugging Face model directory (no config.json); pass --model a directory "
            f"saved with save_pretrained, or 'demo'"
        )
    return path


def read_config(path: Path, trust_remote_code: bool = False):
    """The model's config, checked to be a full-precision model of a supported architecture."""
    from transformers import AutoConfig

    try:
        raw = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ParetoqError(f"{path / 'config.json'} is not valid JSON ({exc}); fix or re-save the model") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type not in ADAPTERS:
        raise ParetoqError(
            f"model_type {model_type!r} in {path} is not supported; supported: {', '.join(supported_model_types())}"
        )
    quant = raw.get("quantization_config")
    if quant:
        raise ParetoqError(
            f"{path} is already quantized (quant_method={quant.get('quant_method')!r}); paretoq needs "
            f"full-precision weights: pass a bf16/fp16/fp32 checkpoint"
        )
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, TypeError) as exc:
        raise ParetoqError(f"cannot read the config in {path}: {exc}") from None


def load_model(
    name_or_path: str | Path = DEMO,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    weights: bool = True,
) -> LoadedModel:
    """Load a model for paretoq.

    Experts run with transformers' "eager" implementation, the exact reference. With
    ``weights=False`` the model is built on the meta device from its config alone: shapes and
    components without reading (or allocating) a single weight, for `paretoq info` on large models.
    """
    # transformers' per-tensor loading bar would interleave with paretoq's own progress and
    # bury the one-line errors on stderr.
    transformers.utils.logging.disable_progress_bar()
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ParetoqError(f"unknown dtype {dtype!r}; pass one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    path = resolve_model_dir(name_or_path)
    config = read_config(path, trust_remote_code)
    if weights:  # after the config, so an unsupported model is named as such first
        check_weight_files(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, experts_implementation="eager",
            local_files_only=True, trust_remote_code=trust_remote_code,
        ).to(device)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, experts_implementation="eager", trust_remote_code=trust_remote_code
            )
    model.eval()
    return LoadedModel(model, load_tokenizer(path), get_adapter(model), str(name_or_path), path)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
