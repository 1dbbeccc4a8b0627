"""Calibration and evaluation token sets.

Text comes from the demo's shipped held-out text (``demo``) or a user's ``.txt`` file (one
document) or ``.jsonl`` file (one document per line, field ``text``). Documents are joined by the
EOS token into one stream, cut into non-overlapping windows of ``seq_len`` tokens, and the windows
are shuffled with a fixed seed: the first go to evaluation, the next to calibration. So the two
sets are disjoint by construction, and the evaluation set depends only on the text, the tokenizer,
``seq_len``, ``eval_tokens`` and the seed, not on how much calibration data was asked for: KL
figures stay comparable across calibration sizes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from paretoq.errors import ParetoqError

if TYPE_CHECKING:  # torch is imported where tokens are made: the CLI reads this module's defaults at start-up
    import torch

DEMO = "demo"
DEFAULT_CALIB_TOKENS = 16_384
DEFAULT_EVAL_TOKENS = 8_192
# The demo was trained on 256-token windows; raise it for long-context models.
DEFAULT_SEQ_LEN = 256
DEFAULT_SEED = 0


@dataclass(frozen=True)
class TokenSet:
    input_ids: torch.Tensor  # [num_sequences, seq_len], int64
    source: str

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def fingerprint(self) -> str:
        """Content hash, for caches keyed by calibration/eval data."""
        return hashlib.sha256(self.input_ids.numpy().tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class TokenSets:
    calib: TokenSet
    eval: TokenSet


def demo_text_path() -> Path:
    return Path(__file__).resolve().parent / "zoo" / "demo" / "heldout.jsonl"


def read_documents(source: str | Path) -> list[str]:
    """The documents of ``demo``, a ``.txt`` file or a ``.jsonl`` file with a ``text`` field."""
    path = demo_text_path() if str(source) == DEMO else Path(source).expanduser()
    if path.is_dir():
        raise ParetoqError(f"--calib {str(source)!r} is a directory; pass --calib a .txt or .jsonl file in it, or 'demo'")
    if not path.is_file():
        raise ParetoqError(f"text file {str(source)!r} does not exist; pass --calib a .txt or .jsonl file, or 'demo'")
    try:
        docs = _read(path)
    except UnicodeDecodeError as exc:
        raise ParetoqError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); pass --calib a UTF-8 "
                           f".txt or .jsonl file (re-encode it, e.g. with iconv -t utf-8)") from None
    if any("\x00" in d for d in docs):
        raise ParetoqError(f"{path} holds NUL bytes, so it is binary, not text; pass --calib a UTF-8 .txt or .jsonl file")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ParetoqError(f"{path} holds no text; pass a file with text in it")
    return docs


def _read(path: Path) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
                    raise ParetoqError(f"{path} line {n} is not JSON; write one JSON object per line") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ParetoqError(f"{path} line {n} has no string field 'text'; write {{\"text\": \"...\"}} per line")
                docs.append(record["text"])
    elif path.suffix == ".txt":
        docs = [path.read_text(encoding="utf-8")]
    else:
        raise ParetoqError(f"cannot read {path.name}: pass a .txt file or a .jsonl file with a 'text' field")
    return docs


def token_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(doc)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def load_token_sets(
    tokenizer,
    source: str | Path = DEMO,
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = DEFAULT_SEED,
    documents: list[str] | None = None,
) -> TokenSets:
    """Disjoint calibration and evaluation windows of ``seq_len`` tokens (sizes rounded up to whole windows).

    ``documents``: the text of ``source`` when the caller already read it (to fail fast on a bad
    file before loading a model), so it is not read twice.
    """
    import torch

    if tokenizer is None:
        raise ParetoqError("the model directory has no tokenizer; save one beside the model (tokenizer.json)")
    for name, value in (("calib-tokens", calib_tokens), ("eval-tokens", eval_tokens), ("seq-len", seq_len)):
        if value <= 0:
            raise ParetoqError(f"--{name} must be positive, got {value}")
    stream = token_stream(tokenizer, documents if documents is not None else read_documents(source))
    n_calib, n_eval = math.ceil(calib_tokens / seq_len), math.ceil(eval_tokens / seq_len)
    available = stream.numel() // seq_len
    if n_calib + n_eval > available:
        raise ParetoqError(
            f"{source} has {stream.numel():,} tokens, {available} windows of {seq_len}; "
            f"{n_calib + n_eval} windows ({calib_tokens:,} calibration + {eval_tokens:,} eval tokens) were asked "
            f"for: pass more text or lower --calib-tokens / --eval-tokens / --seq-len"
        )
    windows = stream[: available * seq_len].view(available, seq_len)
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
    label = f"{source} (seed {seed})"
    return TokenSets(
        calib=TokenSet(windows[order[n_eval : n_eval + n_calib]].clone(), label),
        eval=TokenSet(windows[order[:n_eval]].clone(), label),
    )
