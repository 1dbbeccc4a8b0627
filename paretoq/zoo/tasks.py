"""The demo model's two local lm-eval tasks, and how their data was made.

Both are built from held-out stdlib files (never trained on) that are *not* in ``heldout.jsonl``,
so they share no text with the calibration or KL evaluation windows either:

- ``paretoq_demo_ppl``: ``loglikelihood_rolling`` over whole files (word/byte perplexity, bits per byte);
- ``paretoq_demo_mc``: multiple choice: given 8 lines of code, which of four candidate lines comes
  next? The three distractors are lines of similar length from other files, re-indented like the
  true line so that indentation alone gives nothing away. Chance is 25%.

The data ships in ``tasks/`` (made once with ``python -m paretoq.zoo.tasks``); ``demo_tasks()``
returns the task configs with absolute paths, so they work from any working directory.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from paretoq.cache import atomic_write_text
from paretoq.zoo import corpus

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
PPL_TASK, MC_TASK = "paretoq_demo_ppl", "paretoq_demo_mc"
CONTEXT_LINES = 8  # fits the demo's 256-token window with the candidate line
MC_ITEMS = 300
PPL_CHARS = 60_000


def demo_tasks() -> list[dict]:
    """lm-eval task configs (the same keys as its YAML files) for the two demo tasks."""
    def data(name: str) -> dict:
        return {"data_files": {"test": str(TASKS_DIR / f"{name}.jsonl")}}

    return [
        {
            "task": PPL_TASK, "dataset_path": "json", "dataset_kwargs": data(PPL_TASK), "test_split": "test",
            "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
            "metadata": {"version": 1.0},
        },
        {
            "task": MC_TASK, "dataset_path": "json", "dataset_kwargs": data(MC_TASK), "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        },
    ]


def _unshipped_heldout() -> list[tuple[str, str]]:
    _, heldout = corpus.split_stdlib()
    shipped = {rel for rel, _ in corpus.shipped_heldout(heldout)}
    rest = [(rel, text) for rel, text in heldout if rel not in shipped]
    return sorted(rest, key=lambda item: hashlib.sha256(item[0].encode()).hexdigest())


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def build_demo_tasks(out: Path = TASKS_DIR, seed: int = 0) -> None:
    files = _unshipped_heldout()
    ppl_docs, total = [], 0
    for rel, text in list(files):
        if len(text) <= PPL_CHARS - total:
            ppl_docs.append({"path": rel, "text": text})
            total += len(text)
            files.remove((rel, text))  # the multiple-choice items come from the other files
    rng = random.Random(seed)
    pool = [(rel, ln) for rel, text in files for ln in text.splitlines() if len(ln.strip()) >= 12]
    items = []
    for rel, text in files:
        lines = text.splitlines()
        spots = [i for i in range(CONTEXT_LINES, len(lines)) if len(lines[i].strip()) >= 12
                 and sum(1 for ln in lines[i - CONTEXT_LINES : i] if ln.strip()) >= 4]
        for i in rng.sample(spots, min(6, len(spots))):
            truth = lines[i]
            n = len(truth.strip())
            near = [ln for r, ln in pool if r != rel and 0.6 * n <= len(ln.strip()) <= 1.6 * n and ln.strip() != truth.strip()]
            if len(near) < 3:
                continue
            choices = [truth] + [_indent(truth) + ln.strip() for ln in rng.sample(near, 3)]
            rng.shuffle(choices)
            context = "\n".join(lines[i - CONTEXT_LINES : i]) + "\n"
            items.append({"path": rel, "context": context, "choices": [c + "\n" for c in choices],
                          "label": choices.index(truth)})
        if len(items) >= MC_ITEMS:
            break
    atomic_write_text(out / f"{PPL_TASK}.jsonl", "".join(json.dumps(d) + "\n" for d in ppl_docs))
    atomic_write_text(out / f"{MC_TASK}.jsonl", "".join(json.dumps(d) + "\n" for d in items[:MC_ITEMS]))


if __name__ == "__main__":
    build_demo_tasks()
    print(f"wrote {TASKS_DIR}")
