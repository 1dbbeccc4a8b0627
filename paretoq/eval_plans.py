"""`paretoq eval`: plans assembled from the quant cache, measured against the full-precision model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from paretoq.calibrate import prepare
from paretoq.data import DEFAULT_CALIB_TOKENS, DEFAULT_EVAL_TOKENS, DEFAULT_SEQ_LEN, load_token_sets, read_documents
from paretoq.errors import ParetoqError
from paretoq.evaluate import Assembler, EvalResult, StreamedEvaluator, run_lm_eval
from paretoq.export.gguf_read import open_gguf
from paretoq.plan import Plan
from paretoq.quant.settings import settings_for
from paretoq.walk import open_model


@dataclass
class PlanEval:
    name: str
    avg_bits: float
    effective_bits: float
    size_bytes: int
    result: EvalResult
    lm_eval: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"plan": self.name, "avg_bits": self.avg_bits, "effective_bits": self.effective_bits,
             "size_bytes": self.size_bytes, **self.result.to_dict()}
        if self.lm_eval:
            d["lm_eval"] = self.lm_eval
        return d


@dataclass
class EvalReport:
    plans: list[PlanEval]
    fp_lm_eval: dict = field(default_factory=dict)


def expand_tasks(tasks: list[str]) -> list:
    """Task names for lm-eval; ``demo`` stands for the demo's two local tasks."""
    from paretoq.zoo.tasks import demo_tasks

    out: list = []
    for t in tasks:
        out.extend(demo_tasks() if t == "demo" else [t])
    return out


def check_tasks(tasks: list) -> None:
    """Unknown lm-eval task names fail here, in one line, before the model is loaded."""
    names = [t for t in tasks if isinstance(t, str)]  # the demo's tasks are configs, always known
    if not names:
        return
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ParetoqError("lm-eval is not installed; pip install 'paretoq[eval]' (lm-eval[hf])") from None
    known = TaskManager().all_tasks
    unknown = [t for t in names if t not in known]
    if unknown:
        close = sorted(k for k in known if unknown[0].split("_")[0] in k)[:3]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ParetoqError(f"unknown lm-eval task {unknown[0]!r}{hint}; pass task names that `lm-eval ls tasks` "
                           f"lists, or 'demo'")


GGUF_ACTIVATIONS = ("ggml", "exact")


def eval_plans(
    plans: list[str | Path] = (),
    uniform: list[int] = (),
    gguf: list[str | Path] = (),
    model: str = "demo",
    calib: str = "demo",
    calib_tokens: int = DEFAULT_CALIB_TOKENS,
    eval_tokens: int = DEFAULT_EVAL_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
    lm_eval: list[str] = (),
    lm_eval_limit: int | None = None,
    device: str = "cpu",
    dtype: str | None = None,
    max_memory: str | int | None = None,
    use_cache: bool = True,
    progress: bool = True,
    trust_remote_code: bool = False,
    quant: dict | None = None,
    gguf_activations: str = "ggml",
) -> EvalReport:
    """Evaluate plan files, uniform widths and GGUF files on the model's eval tokens (and lm-eval
    tasks). ``quant``: quantizer settings (``QuantSettings`` field -> value) over each plan's own.
    A GGUF's components, token embedding and output matrix are dequantized into the model
    (`paretoq.export.gguf_read`); its bits are what the file stores per weight. ``gguf_activations``:
    ``"ggml"`` rounds each quantized product's input as llama.cpp does (8-bit, per block;
    `paretoq.export.ggml_activations`), ``"exact"`` measures the dequantized weights alone."""
    if gguf_activations not in GGUF_ACTIVATIONS:
        raise ParetoqError(f"--gguf-activations must be one of {', '.join(GGUF_ACTIVATIONS)}, not {gguf_activations!r}")
    named = [(str(p), Plan.load(p)) for p in plans]
    for _, plan in named:
        plan.quant = settings_for(quant or {}, base=plan.quant)
    widths = settings_for(quant or {}).widths
    for b in uniform:
        if b not in widths:
            raise ParetoqError(f"--uniform {b} is not a bit choice of this quantizer; pass one of "
                               f"{', '.join(map(str, widths))}")
    if not named and not uniform and not gguf:
        raise ParetoqError("nothing to evaluate: pass --plan plan.json (one or more), --uniform BITS or --gguf FILE")
    tasks = expand_tasks(list(lm_eval))
    check_tasks(tasks)
    docs = read_documents(calib)
    sm = open_model(model, dtype=dtype, device=device, max_memory=max_memory, trust_remote_code=trust_remote_code)
    named += [(f"uniform-{b}", Plan.uniform(sm.adapter, b, quant=settings_for(quant or {}))) for b in uniform]
    for _, plan in named:
        plan.validate(sm.adapter)  # every check before any work
    ggufs = [(Path(p).name, open_gguf(p, sm.adapter, sm.model.config)) for p in gguf]
    sets = load_token_sets(sm.loaded.tokenizer, calib, calib_tokens, eval_tokens, seq_len, seed, documents=docs)
    parts = {"eval": sets.eval}
    report = EvalReport([])
    by_settings: dict = {}
    for name, plan in named:
        by_settings.setdefault(plan.quant, set()).update(plan.bits.values())
    evaluators = {}
    references = None
    for settings, widths in by_settings.items():  # one walk per quantizer setting (usually one)
        prep = prepare(sm, sets.calib, parts, settings, tuple(sorted(widths)), seed=seed, features=False,
                       use_cache=use_cache, progress=progress)
        evaluators[settings] = (StreamedEvaluator(sm, prep.cache.weight, parts, prep.references), prep.cache)
        references = prep.references
    if references is None:  # GGUFs only: the fp reference alone
        references = prepare(sm, sets.calib, parts, seed=seed, features=False, use_cache=use_cache,
                             progress=progress).references
    if tasks:
        sm.materialize_all()
        report.fp_lm_eval = run_lm_eval(sm.model, sm.loaded.tokenizer, tasks, max_length=seq_len,
                                        limit=lm_eval_limit)
    for name, plan in named:
        ev, cache = evaluators[plan.quant]
        result = ev.evaluate(plan.bits, "eval")
        scores = {}
        if tasks:  # lm-eval runs the whole model: it needs it resident, with the plan's weights in
            with Assembler(sm.adapter, cache.weight).apply(plan.bits):
                scores = run_lm_eval(sm.model, sm.loaded.tokenizer, tasks, max_length=seq_len, limit=lm_eval_limit)
        a = sm.adapter
        report.plans.append(PlanEval(name, plan.avg_bits(a), plan.effective_bits(a), plan.size_bytes(a), result, scores))
    for name, g in ggufs:
        weight_of, bits = g.as_plan(sm.adapter)
        rounding = g.input_rounding() if gguf_activations == "ggml" else None
        result = StreamedEvaluator(sm, weight_of, parts, references, input_rounding=rounding).evaluate(bits, "eval")
        scores = {}
        if tasks:
            with Assembler(sm.adapter, weight_of).apply(bits):
                scores = run_lm_eval(sm.model, sm.loaded.tokenizer, tasks, max_length=seq_len, limit=lm_eval_limit)
        bpw, nbytes = g.bits(sm.adapter)
        report.plans.append(PlanEval(name, bpw, bpw, nbytes, result, scores))
    return report


def _headline(metrics: dict) -> list[tuple[str, float]]:
    """The metrics worth a column: lm-eval's own names without the ',none' filter suffix."""
    return [(k.split(",")[0], v) for k, v in metrics.items() if k != "sample_len" and "stderr" not in k]


def format_report(report: EvalReport) -> str:
    cols = []
    for task, metrics in (report.plans[0].lm_eval if report.plans else {}).items():
        cols += [(task, m) for m, _ in _headline(metrics)]
    head = f"{'plan':32s} {'avg bits':>8s} {'eff bits':>8s} {'KL':>10s} {'PPL':>8s} {'agree':>6s}"
    head += "".join(f" {t.removeprefix('paretoq_demo_') + ':' + m:>22s}" for t, m in cols)
    lines = [head]

    def row(name, avg, eff, kl, ppl, agree, lm):
        cells = "".join(f" {dict(_headline(lm.get(t, {}))).get(m, float('nan')):22.4f}" for t, m in cols)
        return f"{name:32s} {avg:>8s} {eff:>8s} {kl:>10s} {ppl:8.3f} {agree:>6s}" + cells

    if report.plans:
        fp_ppl = report.plans[0].result.ppl_fp
        lines.append(row("full precision", "-", "-", "0", fp_ppl, "1", report.fp_lm_eval))
    for p in report.plans:
        r = p.result
        lines.append(row(p.name[-32:], f"{p.avg_bits:.3f}", f"{p.effective_bits:.3f}", f"{r.kl:.3g}", r.ppl,
                         f"{r.agreement:.4f}", p.lm_eval))
    if report.plans and not report.plans[0].result.exact_kl:
        lines.append("KL from the fp top-k and tail mass: a lower bound on the full-vocabulary KL")
    return "\n".join(lines)
