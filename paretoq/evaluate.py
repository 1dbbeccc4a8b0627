"""Proxy evaluation of a candidate against the full-precision model, and the lm-eval bridge.

The search's objective is the mean per-token ``KL(p_fp || p_q)`` of the next-token distributions
on held-out eval tokens; perplexity and top-1 agreement are recorded beside it. The fp model's
side (the *reference*) is computed once per (model, eval set) in the calibration walk
(`paretoq.calibrate`) and cached on disk: exact fp log-probabilities, in memory while they fit in
``max_bytes`` (default 1 GiB: the demo needs 134 MB), else read back one batch file at a time
(`DiskLogprobs`).

`compute_reference` and `evaluate` are the same measurement on a model held whole in memory (the
tests' reference for the streamed path). Beyond ``max_bytes`` that reference keeps, per token, the
fp top-``k`` log-probs and the tail mass ``1 - sum(top-k p)``, and KL is computed between the two
distributions coarsened to those ``k + 1`` outcomes. That is a lower bound on the true KL (data
processing inequality); the gap is exactly ``sum_t p_tail,t * KL(p(.|tail_t) || q(.|tail_t))``,
the tail's own divergence weighted by its mass, which the tests check on the demo.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from paretoq.data import TokenSet
from paretoq.models import OUTER_KINDS, Adapter

DEFAULT_MAX_BYTES = 1 << 30
DEFAULT_TOP_K = 256
DEFAULT_BATCH_SIZE = 8


@dataclass
class Reference:
    """The fp model's next-token distributions on the eval tokens (positions ``[:, :-1]``)."""

    input_ids: torch.Tensor  # [N, T]
    nll: float  # the fp model's mean next-token NLL
    argmax: torch.Tensor  # [N, T-1] the fp model's top-1 prediction
    logprobs: torch.Tensor | None = None  # [N, T-1, V] when exact
    topk_index: torch.Tensor | None = None  # [N, T-1, k] otherwise
    topk_logp: torch.Tensor | None = None
    tail_logp: torch.Tensor | None = None  # [N, T-1] log of the mass outside the top-k

    @property
    def exact(self) -> bool:
        return self.logprobs is not None

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids, "argmax": self.argmax, "nll": torch.tensor(self.nll, dtype=torch.float64)}
        for name in ("logprobs", "topk_index", "topk_logp", "tail_logp"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).contiguous()
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> Reference:
        return cls(t["input_ids"], float(t["nll"]), t["argmax"], t.get("logprobs"), t.get("topk_index"),
                   t.get("topk_logp"), t.get("tail_logp"))


@dataclass(frozen=True)
class EvalResult:
    kl: float
    ppl: float
    ppl_fp: float
    agreement: float
    tokens: int
    exact_kl: bool
    # mean KL of each eval window, in order: paired comparisons of two plans on the same windows
    kl_windows: tuple[float, ...] = field(default=(), repr=False)

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["kl_windows"]  # per-window detail stays in the study, not in reports
        return d


def _batches(ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for i in range(0, ids.shape[0], batch_size):
        yield ids[i : i + batch_size]


@torch.no_grad()
def _logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probs ``[B, T-1, V]`` in float32. Called without labels or router outputs, so
    no auxiliary router loss can reach the perplexity."""
    device = next(model.parameters()).device
    logits = model(ids.to(device), use_cache=False).logits[:, :-1]
    return F.log_softmax(logits.float(), dim=-1).cpu()


def compute_reference(model, eval_set: TokenSet, max_bytes: int = DEFAULT_MAX_BYTES, top_k: int = DEFAULT_TOP_K,
                      batch_size: int = DEFAULT_BATCH_SIZE) -> Reference:
    ids = eval_set.input_ids
    vocab = model.config.vocab_size
    exact = ids.shape[0] * (ids.shape[1] - 1) * vocab * 4 <= max_bytes
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("logprobs", "argmax", "idx", "logp", "tail")}
    nll_sum = 0.0
    for batch in _batches(ids, batch_size):
        lp = _logprobs(model, batch)
        nll_sum -= lp.gather(-1, batch[:, 1:, None]).sum().item()
        parts["argmax"].append(lp.argmax(-1))
        if exact:
            parts["logprobs"].append(lp)
        else:
            v, i = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
            parts["idx"].append(i.to(torch.int32))
            parts["logp"].append(v)
            parts["tail"].append(torch.log1p(-v.exp().sum(-1).clamp(max=1 - 1e-7)))
    cat = {k: torch.cat(v) if v else None for k, v in parts.items()}
    return Reference(ids, nll_sum / ids[:, 1:].numel(), cat["argmax"], cat["logprobs"], cat["idx"], cat["logp"],
                     cat["tail"])


def _kl_batch(ref: Reference, rows: slice, lq: torch.Tensor) -> torch.Tensor:
    """Sum over each window's positions of KL(p || q), ``[B]`` on ``lq``'s device."""
    if ref.exact:
        lp = ref.logprobs[rows].to(lq.device)
        return (lp.exp() * (lp - lq)).sum((-1, -2))
    d = lq.device
    idx, lp, tail = ref.topk_index[rows].long().to(d), ref.topk_logp[rows].to(d), ref.tail_logp[rows].to(d)
    lq_top = lq.gather(-1, idx)
    lq_tail = torch.log1p(-lq_top.exp().sum(-1).clamp(max=1 - 1e-7))
    return (lp.exp() * (lp - lq_top)).sum((-1, -2)) + (tail.exp() * (tail - lq_tail)).sum(-1)


def evaluate(model, ref: Reference, batch_size: int = DEFAULT_BATCH_SIZE) -> EvalResult:
    """KL to the reference, perplexity and top-1 agreement of ``model`` on the reference's tokens."""
    ids = ref.input_ids
    batches = [_metrics_batch(ref, slice(s, s + batch_size), _logprobs(model, ids[s : s + batch_size]),
                              ids[s : s + batch_size]) for s in range(0, ids.shape[0], batch_size)]
    return _result(ref, batches)


def _result(ref: Reference, batches: list[tuple[list[float], float, int]]) -> EvalResult:
    """The metrics from their sums over the reference's predicted positions, batch by batch."""
    n = ref.input_ids[:, 1:].numel()
    per_window = ref.input_ids.shape[1] - 1
    kl_rows = [k for b in batches for k in b[0]]
    kl, nll, agree = sum(kl_rows), sum(b[1] for b in batches), sum(b[2] for b in batches)
    return EvalResult(kl=max(kl / n, 0.0), ppl=math.exp(nll / n), ppl_fp=ref.ppl, agreement=agree / n, tokens=n,
                      exact_kl=ref.exact, kl_windows=tuple(k / per_window for k in kl_rows))


class Assembler:
    """Swaps cached quantized weights into the live model and puts the originals back.

    The first time a component is swapped its full-precision weight is copied (to CPU) once; every
    restore copies it back, so after any number of candidates the model is bit-identical to the
    original. Nothing else of the model is copied.
    """

    def __init__(self, adapter: Adapter, weight_of):
        self.adapter = adapter
        self.weight_of = weight_of  # (key, bits) -> dequantized [out, in] tensor, e.g. QuantCache.weight
        self._originals: dict[str, torch.Tensor] = {}

    @contextmanager
    def apply(self, bits: dict[str, int]) -> Iterator[None]:
        try:
            for key, b in bits.items():
                if key not in self._originals:
                    self._originals[key] = self.adapter.weight(key).detach().to("cpu", copy=True)
                self.adapter.set_weight(key, self.weight_of(key, b))
            yield
        finally:
            for key in bits:
                if key in self._originals:
                    self.adapter.set_weight(key, self._originals[key])


class DiskLogprobs:
    """Exact fp log-probs ``[N, T-1, V]`` stored one batch of windows per file and read batch by batch
    (Qwen3's 151,936-token vocabulary makes 8,192 eval tokens 5 GB in float32)."""

    def __init__(self, directory: Path, batch_size: int, num_windows: int):
        self.directory, self.batch_size, self.num_windows = Path(directory), batch_size, num_windows

    def file(self, i: int) -> Path:
        return self.directory / f"batch{i}.safetensors"

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.num_windows)
        first, last = start // self.batch_size, (stop - 1) // self.batch_size
        parts = [load_file(str(self.file(i)))["logprobs"] for i in range(first, last + 1)]
        t = torch.cat(parts) if len(parts) > 1 else parts[0]
        offset = first * self.batch_size
        return t[start - offset : stop - offset]


def _metrics_batch(ref: Reference, rows: slice, lq: torch.Tensor,
                   batch: torch.Tensor) -> tuple[list[float], float, int]:
    """(each window's sum of KL, sum of NLL, top-1 agreements) over one batch; the reference's rows go to
    ``lq``'s device."""
    kl = _kl_batch(ref, rows, lq).tolist()
    nll = -lq.gather(-1, batch[:, 1:, None].to(lq.device)).sum().item()
    agree = (lq.argmax(-1).cpu() == ref.argmax[rows]).sum().item()
    return kl, nll, agree


class StreamedEvaluator:
    """Evaluates plans (component key -> bits) against the fp model on named parts of the eval windows.

    This is the one door through which the search, the sensitivity pass, the baselines and `paretoq
    eval` measure a plan: ``evaluate(bits, part)`` gives the KL, perplexity and agreement of the
    model with those components at those widths (from ``weight_of``, e.g. `QuantCache.weight`), the
    rest in full precision. ``parts`` names disjoint window sets, e.g. ``{"select": ..., "test":
    ...}``: the search selects on one and reports on the other; ``references`` holds each part's fp
    reference (`paretoq.calibrate.prepare` computes them in its walk).

    A plan is measured by walking the layers over a part's eval windows, each layer's components at
    the plan's widths.

    The inputs of every layer under the last plan evaluated on a part are kept (on the device), so
    a plan that agrees with it on layers ``0..L-1`` starts at layer ``L``: a local proposal that
    changes one group in the last layers, or a sensitivity measurement of one layer, costs the
    layers from its first change on. Memory: one layer's weights (or the resident model) plus
    ``(layers + 1) x`` the part's activations (``windows x seq_len x hidden`` in the compute dtype).
    """

    def __init__(self, sm, weight_of, parts: dict[str, TokenSet], references: dict[str, Reference],
                 batch_size: int = DEFAULT_BATCH_SIZE, input_rounding: dict | None = None):
        self.sm, self.weight_of, self.parts, self._refs = sm, weight_of, parts, dict(references)
        self.batch_size = batch_size
        # component key (or "lm_head") -> how an engine rounds that product's input
        # (`paretoq.export.ggml_activations`): a GGUF scored as llama.cpp computes it
        self.input_rounding = input_rounding or {}
        self.evaluations = 0
        self.layers_run = 0  # decoder-layer passes over a part, for cost accounting
        self._prefix: dict[str, tuple[list[tuple], list[list[torch.Tensor]]]] = {}

    def reference(self, part: str) -> Reference:
        return self._refs[part]

    @property
    def streams(self) -> bool:
        """Whether each walk reads the layers anew (not resident): then parts measured together cost
        about what one costs, and the search measures its held-out part in each trial's walk."""
        return not self.sm.resident

    @contextmanager
    def _swapped(self, bits: dict[str, int], restore: bool = False) -> Iterator[None]:
        """``bits``' weights in the model for the block; the originals put back after it when the
        model is resident (from copies) or ``restore`` (the token embedding and output head, which a
        streamed model holds too: read back from the checkpoint, not copied, since at Qwen3's
        vocabulary the two are 1.2 GB)."""
        adapter, sm = self.sm.adapter, self.sm
        saved = {k: adapter.weight(k).detach().clone() for k in bits} if sm.resident else {}
        try:
            for key, b in sorted(bits.items(), key=lambda kv: kv[1]):  # each (layer, width) entry read once
                adapter.set_weight(key, self.weight_of(key, b))
            yield
        finally:
            for key, W in saved.items():
                adapter.set_weight(key, W)
            if restore and not sm.resident:
                for key in bits:
                    adapter.set_weight(key, sm.reread_outside(f"{key}.weight"))

    def _rounded(self, keys) -> AbstractContextManager:
        """The engine's input rounding for the products of ``keys`` (and "lm_head"), if any."""
        if not self.input_rounding:
            return nullcontext()
        from paretoq.export.ggml_activations import rounded_linear_inputs

        a = self.sm.adapter
        weights = [(self.sm.model.get_output_embeddings().weight if k == "lm_head" else a.weight(k), r)
                   for k in keys if (r := self.input_rounding.get(k)) is not None]
        return rounded_linear_inputs(weights)

    def evaluate(self, bits: dict[str, int], part: str) -> EvalResult:
        return self.evaluate_parts(bits, (part,))[part]

    @torch.no_grad()
    def evaluate_parts(self, bits: dict[str, int], parts: tuple[str, ...]) -> dict[str, EvalResult]:
        """The plan on several parts in one walk over the layers: each layer is read (and its plan
        weights assembled) once for all of them, which is most of a walk's cost for a streamed model."""
        sm = self.sm
        # The token embedding (layer -1) and output head (layer n) stay swapped in for the whole walk:
        # a new embedding restarts it at layer 0, a new head changes only the log-probs.
        with self._swapped({k: b for k, b in bits.items() if sm.adapter.component(k).kind in OUTER_KINDS},
                           restore=True):
            return self._walk_parts(bits, parts)

    def _walk_parts(self, bits: dict[str, int], parts: tuple[str, ...]) -> dict[str, EvalResult]:
        sm, n, bs = self.sm, self.sm.num_layers, self.batch_size
        by_layer: dict[int, dict[str, int]] = {}
        for key, b in bits.items():
            by_layer.setdefault(sm.adapter.component(key).layer, {})[key] = b
        sigs = [tuple(sorted(by_layer.get(i, {}).items())) for i in range(-1, n)]  # [0]: the embedding's
        walks = {}  # part -> [first layer to run, token shapes of its batches, inputs of layers 0..i]
        for part in parts:
            ids = self.parts[part].input_ids
            shapes = [tuple(ids[s : s + bs].shape) for s in range(0, ids.shape[0], bs)]
            old_sigs, inputs = self._prefix.get(part, (None, None))
            start = 0
            if old_sigs is not None and old_sigs[0] == sigs[0]:
                while start < n and old_sigs[start + 1] == sigs[start + 1]:
                    start += 1
                inputs = inputs[: start + 1]
            else:
                inputs = [sm.embed(ids, bs)]
            walks[part] = [start, shapes, inputs]
        for i in range(min(w[0] for w in walks.values()), n):
            todo = [w for w in walks.values() if w[0] <= i]
            with sm.layer(i) as layer, self._swapped(by_layer.get(i, {})), self._rounded(by_layer.get(i, {})):
                for w in todo:
                    w[2].append([sm.run(i, layer, x, shape) for x, shape in zip(w[2][i], w[1])])
            self.layers_run += len(todo)
        out = {}
        with self._rounded(["lm_head"]):
            for part, (_, shapes, inputs) in walks.items():
                ref, ids = self._refs[part], self.parts[part].input_ids
                self._prefix[part] = (sigs, inputs)
                batches = []
                for j, x in enumerate(inputs[n]):
                    rows = slice(j * bs, j * bs + shapes[j][0])
                    batches.append(_metrics_batch(ref, rows, sm.logprobs(x), ids[rows]))
                out[part] = _result(ref, batches)
                self.evaluations += 1
        return out


def run_lm_eval(model, tokenizer, tasks: list, batch_size: int = 8, max_length: int = 256,
                limit: int | None = None) -> dict:
    """Run lm-eval in-process on ``model`` (offline). ``tasks``: names or task config dicts.

    Returns ``{task: {metric: value}}`` with lm-eval's own metric names (``acc,none`` ...).
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        from paretoq.errors import ParetoqError

        raise ParetoqError("lm-eval is not installed; pip install 'paretoq[eval]' (lm-eval[hf])") from None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    res = simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(), num_fewshot=0, limit=limit,
                          log_samples=False, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                          torch_random_seed=0, fewshot_random_seed=0)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith("alias")}
            for task, metrics in res["results"].items()}
