"""`paretoq search`: the Optuna study and its verify loop, in stages.

1. ``_check``: the space, the groups and the budget, from shapes alone (no weight is read).
2. ``_prepare``: everything that touches the model (capture, probe features, the quant cache at
   every width, the evaluator with its fp references). It is the one place that builds them; the
   rest of the search uses only the ``Prepared`` it returns, so the streamed layer walk can
   replace its inside.
3. ``search``: measured sensitivities (``probes/sensitivity.py``, O(layers x kinds x widths)
   evaluations by default), the baselines (the seed papers' heuristics and the exact knapsack over
   the sensitivities), then the study: two objectives (KL, average bits), both minimised, the
   budget as a constraint. Rounds: refit the surrogate on every verified trial; enqueue the plans
   one exchange away from the best verified plan that a fit weighted towards it predicts best (a
   trust region: the local proposals), the surrogate's exact optima under the budget and below it
   (the global proposals: it is additive, so this is an exact knapsack), and children bred by
   NSGA-II from the verified plans (exploration). Every trial is a real evaluation of a plan
   assembled from the quant cache, on the selection windows.
4. ``_held_out``: the best plan, every front point and every baseline re-measured on the held-out
   windows the search never used (the last third of the eval windows); claims are made on those.

A trial's plan is one ``genome`` user attribute (a digit per group), never one Optuna parameter per
group: storing per-group parameters cost 1.2 s/trial at 64 groups and 30-40 s at 1,500 (measured),
and real models have thousands. Every plan is enqueued with its genome (Optuna keeps the queue,
the objectives, the constraint, heartbeats and retries), so the study's sampler samples nothing;
NSGA-II's selection and variation run in ``paretoq/nsga.py`` on the verified plans.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
import torch
from tqdm import tqdm

from paretoq import baselines as bl
from paretoq import dashboard, report
from paretoq.calibrate import prepare
from paretoq.data import (DEFAULT_CALIB_TOKENS, DEFAULT_EVAL_TOKENS, DEFAULT_SEQ_LEN, TokenSet, TokenSets,
                          load_token_sets, read_documents)
from paretoq.errors import ParetoqError
from paretoq.evaluate import StreamedEvaluator
from paretoq.export.targets import get_target, target_space
from paretoq.models import OUTER_KINDS, Adapter
from paretoq.nsga import offspring
from paretoq.plan import Plan, check_budget
from paretoq.quant.ggml import library as ggml_library
from paretoq.probes.sensitivity import METHODS as SENSITIVITY_METHODS
from paretoq.probes.sensitivity import measure_sensitivity, resolve_method
from paretoq.quant.settings import QuantSettings, check_group_size, flag_args, settings_for
from paretoq.storage import DEFAULT_STORAGE, HEARTBEAT_SECONDS, open_storage
from paretoq.space import (Group, SearchSpace, component_bits, decode_genome, encode_genome, load_space, make_groups,
                           min_max_bits, restrict_bits)
from paretoq.surrogate import Surrogate, Tables, build_tables, kendall_tau
from paretoq.walk import StreamedModel, open_model

MODES = ("surrogate", "local", "nsga2", "random")  # local: trust-region exchanges ranked by the sensitivities alone
SURROGATE_SHARE = 0.7  # of each round; the rest is NSGA-II's children of the verified plans
MAX_CONSECUTIVE_FAILURES = 10  # failed trials in a row before the search gives up
# How long a worker that joins a new study waits for its creator to enqueue the baselines.
BASELINE_WAIT_SECONDS = 30.0
TEST_FRACTION = 1 / 3  # the last third of the eval windows is held out: never used to select
COMPLETE, RUNNING, WAITING = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING,
                              optuna.trial.TrialState.WAITING)


@dataclass
class SearchConfig:
    budget: float = 3.0
    model: str = "demo"
    calib: str = "demo"
    space: str = "default"
    bits: tuple[int, ...] | None = None
    trials: int = 100
    timeout: float | None = None
    seed: int = 0
    study: str | None = None
    storage: str | None = None
    out: Path | None = None
    mode: str = "surrogate"
    with_baselines: bool = True
    round_size: int = 10
    sensitivity: str = "auto"  # probes/sensitivity.py: "auto", "unit" (cost independent of G), "lowest", "group"
    sensitivity_tokens: int = 2048
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    eval_tokens: int = DEFAULT_EVAL_TOKENS
    seq_len: int = DEFAULT_SEQ_LEN
    jobs: int = 1  # worker processes on this machine, all on one study
    worker: bool = False  # a worker started by --jobs: verifies trials, writes no outputs
    heartbeat: int = HEARTBEAT_SECONDS
    device: str = "cpu"
    dtype: str | None = None  # None: the checkpoint's own (float32 for the demo)
    max_memory: str | int | None = None  # None: keep the model resident when it fits, else stream
    use_cache: bool = True
    progress: bool = True
    trust_remote_code: bool = False
    target: str | None = None  # an export target (paretoq.export.TARGETS): propose only plans it can load
    quant: dict = field(default_factory=dict)  # the user's quantizer settings (QuantSettings field -> value)

    def settings(self) -> QuantSettings:
        """What the search measures: the user's settings, then what the target's engine runs, then the defaults."""
        return settings_for(self.quant, get_target(self.target) if self.target else None)


@dataclass
class Prepared:
    """What the search needs from the model, built by ``_prepare`` alone.

    ``evaluator``: ``evaluate(component_bits, part) -> EvalResult``, ``reference(part).ppl`` and an
    ``evaluations`` counter, over the parts "select" (the search's windows), "sens" (the first
    windows of "select", for sensitivities) and "test" (held out).
    """

    adapter: Adapter
    model_info: dict  # {"name_or_path", "model_type"} as plans record them
    settings: QuantSettings
    loss: dict[tuple[str, int], float]  # GPTQ's loss of each (component key, bits)
    usage: dict[str, float]  # component key -> routing usage (1 outside routed experts)
    evaluator: object  # paretoq.evaluate.StreamedEvaluator, or anything with its interface
    features: object | None = None  # probes.features.Features: the seed heuristics need them
    cache_key: str | None = None  # what the sensitivities depend on (None: not cached on disk)


@dataclass
class SearchState:
    """What the report needs from a finished search."""

    config: SearchConfig
    study: optuna.Study
    groups: list[Group]
    plan: Plan | None
    baselines: dict[str, int]  # baseline name -> trial number
    fp_ppl: float
    out: Path
    timings: dict[str, float] = field(default_factory=dict)
    taus: list[tuple[str, float]] = field(default_factory=list)  # (round, Kendall tau on unseen trials)
    interrupted: bool = False
    held_out: dict[int, dict] = field(default_factory=dict)  # trial number -> metrics on the held-out windows
    fp_ppl_test: float = math.nan
    evaluations: dict[str, int] = field(default_factory=dict)  # plans evaluated, by stage


def default_study_name(model: str, budget: float) -> str:
    return f"{Path(str(model)).name or 'model'}-{budget:g}bit"


class NonFiniteEvaluation(Exception):
    """A candidate's evaluation gave NaN or inf: its trial fails with the reason, the search goes on."""


def _check_writable(out: Path) -> None:
    """Fail before the long work if the outputs cannot be written (no file is left behind)."""
    new = [p for p in [out, *out.parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".paretoq-write-check-"):
            pass
    except OSError as exc:
        raise ParetoqError(f"cannot write outputs to {out} ({exc.strerror or exc}); pass --out a writable directory") from None
    finally:
        for p in new:  # directories made for the check go again; write_outputs makes them at the end
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()


def _check_same_quantizer(storage, name: str, settings: QuantSettings) -> None:
    """A study resumed (or joined) with other quantizer settings would mix trials measured with two
    quantizers in one front: refuse it before the long work."""
    try:
        recorded = storage.get_study_user_attrs(storage.get_study_id_from_name(name)).get("quant")
    except KeyError:  # a new study
        return
    if recorded is not None and recorded != settings.to_dict():
        differ = ", ".join(f"{k} {recorded.get(k)!r}" for k, v in settings.to_dict().items() if recorded.get(k) != v)
        raise ParetoqError(f"study {name!r} was measured with {differ}; pass the same quantizer settings to resume "
                           f"it, or a new --study")


def _spawn_workers(cfg: SearchConfig, name: str) -> list[subprocess.Popen]:
    """``--jobs N``: N-1 more worker processes of this search on the same study."""
    args = [sys.executable, "-m", "paretoq.cli", "search", "--worker", "--jobs", str(cfg.jobs),
            "--budget", str(cfg.budget), "--model", str(cfg.model), "--calib", str(cfg.calib), "--space", cfg.space,
            "--trials", str(cfg.trials), "--seed", str(cfg.seed), "--study", name, "--mode", cfg.mode,
            "--calib-tokens", str(cfg.calib_tokens), "--eval-tokens", str(cfg.eval_tokens),
            "--seq-len", str(cfg.seq_len), "--device", cfg.device, "--heartbeat", str(cfg.heartbeat),
            "--sensitivity", cfg.sensitivity,
            "--storage", cfg.storage or DEFAULT_STORAGE]
    args += ["--bits", ",".join(map(str, cfg.bits))] if cfg.bits else []
    args += ["--timeout", str(cfg.timeout)] if cfg.timeout else []
    args += ["--trust-remote-code"] if cfg.trust_remote_code else []
    args += ["--dtype", cfg.dtype] if cfg.dtype else []
    args += ["--max-memory", str(cfg.max_memory)] if cfg.max_memory is not None else []
    args += ["--target", cfg.target] if cfg.target else []
    args += ["--out", str(cfg.out)] if cfg.out else []  # where the dashboard's artifacts go, as this worker's
    args += ["--no-cache"] if not cfg.use_cache else []
    args += flag_args(cfg.quant)
    return [subprocess.Popen(args, stdout=subprocess.DEVNULL) for _ in range(cfg.jobs - 1)]


def _open_study(name: str, storage, sampler) -> tuple[optuna.Study, bool]:
    """The study, and whether this worker created it. Creation is atomic in the database (a unique
    study name), so of several workers started at once exactly one creates the study."""
    try:
        return optuna.create_study(study_name=name, storage=storage, directions=["minimize", "minimize"],
                                   sampler=sampler), True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        if [d.name for d in study.directions] != ["MINIMIZE", "MINIMIZE"]:
            raise ParetoqError(f"study {name!r} exists with other objectives; pass a new --study name") from None
        return study, False


def _enqueue_baselines(study: optuna.Study, baseline_genomes: dict[str, str], created: bool) -> None:
    """Baselines are enqueued once per study: by the worker that created it. A later run enqueues
    what is missing only when the creator never finished (no ``baselines_enqueued`` mark) and no
    other worker is active, so workers started together never enqueue twice.

    One trial per distinct plan: heuristics often coincide (at real sizes with few groups, half of
    them did), and a full streamed walk per copy would take trials from the search proper. The
    trial is tagged with the first name; every name with that plan maps to it (`dashboard`)."""
    if not baseline_genomes or study.user_attrs.get("baselines_enqueued"):
        return
    if not created:  # its creator enqueues right after creating it: wait for the mark, then only if it died
        deadline = time.time() + BASELINE_WAIT_SECONDS
        while time.time() < deadline and not study.user_attrs.get("baselines_enqueued"):  # read from the storage
            time.sleep(0.5)
        if study.user_attrs.get("baselines_enqueued") or any(
                t.state in (RUNNING, WAITING) for t in study.get_trials(deepcopy=False)):
            return
    alive = [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.FAIL]
    sources = {t.user_attrs.get("source") for t in alive}
    genomes = {t.user_attrs.get("genome") for t in alive}
    for bname, genome in baseline_genomes.items():
        if f"baseline:{bname}" not in sources and genome not in genomes:
            study.enqueue_trial({}, user_attrs={"source": f"baseline:{bname}", "genome": genome})
            genomes.add(genome)
    study.set_user_attr("baselines_enqueued", True)


def _give_back(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Put a plan that was queued (a baseline, a proposal, a retry) back in the queue, as Optuna's
    retry callback does, so a trial this worker gives up is verified later, by it or another."""
    if not trial.params and "fixed_params" not in trial.system_attrs:
        return  # sampled on the spot: nothing was promised
    study.add_trial(optuna.create_trial(
        state=WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={k: v for k, v in trial.user_attrs.items() if k != "worker"}, system_attrs=dict(trial.system_attrs)))


def _kendall_taus(done) -> list[tuple[str, float]]:
    """Per round: Kendall tau between the KL the surrogate predicted for its proposals before they
    were verified and the KL measured."""
    rounds: dict[str, list] = {}
    for t in done:
        if t.user_attrs.get("source") == "surrogate" and "round" in t.user_attrs:
            rounds.setdefault(t.user_attrs["round"], []).append(t)
    taus = []
    for key, ts in rounds.items():
        tau = kendall_tau([t.user_attrs["predicted_kl"] for t in ts], [t.values[0] for t in ts])
        if math.isfinite(tau):
            taus.append((key.rsplit("/", 1)[-1] if len({k.rsplit("/", 1)[0] for k in rounds}) == 1 else key, tau))
    return taus


def _check(cfg: SearchConfig) -> tuple[SearchSpace, list[Group], TokenSets, StreamedModel]:
    """Everything that can be checked before the long work: from shapes alone, no weight read.
    The model is opened here (a skeleton on meta over its checked shards) and streamed later."""
    check_budget(cfg.budget)
    settings = cfg.settings()  # a flag the target's engine cannot run
    if cfg.mode not in MODES:
        raise ParetoqError(f"unknown search mode {cfg.mode!r}; use one of {', '.join(MODES)}")
    if cfg.sensitivity not in SENSITIVITY_METHODS:
        raise ParetoqError(f"unknown sensitivity method {cfg.sensitivity!r}; use one of {', '.join(SENSITIVITY_METHODS)}")
    if cfg.jobs < 1:
        raise ParetoqError(f"--jobs must be at least 1, got {cfg.jobs}")
    if cfg.heartbeat < 1:
        raise ParetoqError(f"--heartbeat must be at least 1 second, got {cfg.heartbeat}")
    if cfg.eval_tokens < 3 * cfg.seq_len:
        raise ParetoqError(f"--eval-tokens {cfg.eval_tokens} gives fewer than 3 windows of --seq-len {cfg.seq_len}; "
                           "the search selects on two thirds and holds out one: raise --eval-tokens")
    space = restrict_bits(load_space(cfg.space), cfg.bits)
    space = target_space(space, cfg.target, cfg.budget)
    docs = read_documents(cfg.calib)
    # Missing or truncated shards, a bad --dtype or --device: before the study is created.
    sm = open_model(cfg.model, dtype=cfg.dtype, device=cfg.device, max_memory=cfg.max_memory,
                    trust_remote_code=cfg.trust_remote_code)
    groups = make_groups(sm.adapter, space, settings.budget_bits)
    if not groups:
        raise ParetoqError(f"search space {space.name!r} selects no component of this model; check its 'bits' kinds")
    outer = [g.name for g in groups if g.kind in OUTER_KINDS]
    if outer and settings.method != "ggml":
        raise ParetoqError(f"search space {space.name!r} quantizes {outer[0]!r} (the token embedding or output head), "
                           "which only llama.cpp's types do; search with --target llamacpp or drop embed/head from "
                           "the space")
    if settings.method == "ggml":  # rows a type cannot tile are priced and measured at llama-quantize's fallback
        ggml_library()
    else:
        check_group_size(settings.group_size, {k: sm.adapter.component(k).shape[1] for g in groups for k in g.keys})
    lo, _ = min_max_bits(groups)
    if cfg.budget < lo - 1e-9:
        raise ParetoqError(f"budget {cfg.budget:g} is below the smallest plan of this space ({lo:.3f} bits); raise --budget")
    sets = load_token_sets(sm.loaded.tokenizer, cfg.calib, cfg.calib_tokens, cfg.eval_tokens, cfg.seq_len, cfg.seed,
                           documents=docs)
    return space, groups, sets, sm


def split_windows(eval_set: TokenSet, sensitivity_windows: int) -> dict[str, TokenSet]:
    """The eval windows' parts: "test" the last third (held out, never used to select), "select"
    the rest, "sens" the first ``sensitivity_windows`` of "select"."""
    ids = eval_set.input_ids
    n_test = max(1, math.ceil(len(ids) * TEST_FRACTION))
    select = TokenSet(ids[: len(ids) - n_test], eval_set.source)
    return {"select": select, "test": TokenSet(ids[len(ids) - n_test:], eval_set.source),
            "sens": TokenSet(select.input_ids[: max(1, min(sensitivity_windows, len(select.input_ids)))], eval_set.source)}


def _prepare(cfg: SearchConfig, groups: list[Group], sets: TokenSets, sm: StreamedModel) -> Prepared:
    """The one place that builds the capture, probes, quant cache, references and evaluator: one
    walk over the layers (`paretoq.calibrate`), each entry cached on disk, from the model and the
    token sets ``_check`` opened."""
    settings = cfg.settings()
    parts = split_windows(sets.eval, math.ceil(cfg.sensitivity_tokens / cfg.seq_len))
    widths = tuple(sorted({b for g in groups for b in g.choices}))
    walk = prepare(sm, sets.calib, parts, settings, widths, seed=cfg.seed, use_cache=cfg.use_cache,
                   progress=cfg.progress)
    features, cache, cap_key, loaded = walk.features, walk.cache, walk.capture_key, sm.loaded
    cache.fill_outer({k for g in groups if g.kind in OUTER_KINDS for k in g.keys}, widths)
    by_key = features.by_key()
    return Prepared(adapter=loaded.adapter,
                    model_info={"name_or_path": str(cfg.model), "model_type": loaded.model.config.model_type},
                    settings=settings, loss=cache.loss, usage={k: float(r.usage) for k, r in by_key.items()},
                    evaluator=StreamedEvaluator(sm, cache.weight, parts, walk.references), features=features,
                    cache_key=f"{cap_key}/{settings.to_dict()}/{parts['sens'].fingerprint()}")


def run_search(cfg: SearchConfig) -> SearchState:
    started = time.time()
    space, groups, sets, sm = _check(cfg)
    name = cfg.study or default_study_name(cfg.model, cfg.budget)
    out = Path(cfg.out) if cfg.out else Path("studies") / name
    if not cfg.worker:
        _check_writable(out)
    storage = open_storage(cfg.storage, cfg.heartbeat)  # a bad URL fails now, before the long work
    _check_same_quantizer(storage, name, cfg.settings())
    if cfg.jobs > 1:  # share the cores with the other workers of this machine (this one included)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.jobs))
    t = time.time()
    prep = _prepare(cfg, groups, sets, sm)
    timings = {"setup (capture, probes, quant cache)": time.time() - t}
    return search(cfg, groups, prep, storage, space_name=space.name, started=started, timings=timings)


def _recorded_method(storage, name: str) -> str | None:
    """The sensitivity method a study was started with (None for a new study). Read before the
    sensitivity pass, without creating the study: the creator creates it and enqueues its
    baselines back to back after that pass, so that workers started with it never find a study
    without baselines and enqueue them again."""
    try:
        return optuna.load_study(study_name=name, storage=storage).user_attrs.get("sensitivity")
    except KeyError:  # no such study yet
        return None


def _sensitivity_tables(cfg: SearchConfig, groups: list[Group], prep: Prepared,
                        recorded: str | None = None) -> tuple[Tables, str]:
    usage = {g.name: float(np.mean([prep.usage.get(k, 1.0) for k in g.keys])) for g in groups}
    # `auto` depends on --trials; a resumed study keeps the method it started with, or a resume
    # with another --trials would measure other sensitivities than its baselines were built on
    method = recorded if cfg.sensitivity == "auto" and recorded else resolve_method(cfg.sensitivity, groups, cfg.trials)
    sensitivity = measure_sensitivity(lambda bits: prep.evaluator.evaluate(bits, "sens").kl, groups, method,
                                      loss=prep.loss, usage=usage, cache_key=prep.cache_key, progress=cfg.progress)
    return build_tables(groups, sensitivity, prep.loss, usage), method


def _baselines(cfg: SearchConfig, groups: list[Group], prep: Prepared, tables: Tables) -> dict[str, str]:
    """Baseline name -> genome, in the order they are queued: the exact knapsack over the measured
    sensitivities first (the plan the search must beat, and the anchor of ``_keep_the_knapsack``:
    at real sizes a user's few ``--trials`` may not reach the end of the queue), then the seed
    heuristics (they need the probe features)."""
    if not cfg.with_baselines:
        return {}
    sens = {g.name: {b: float(tables.sens[i, g.choices.index(b)]) for b in g.choices} for i, g in enumerate(groups)}
    plans = {"knapsack": bl.knapsack(groups, sens, cfg.budget)}
    if prep.features is not None:
        plans.update(bl.heuristics(groups, prep.features, cfg.budget))
    return {name: encode_genome(tables.genome(bits)) for name, bits in plans.items()}


def _genomes(done) -> np.ndarray:
    return np.array([decode_genome(t.user_attrs["genome"]) for t in done])


def _round(cfg: SearchConfig, tables: Tables, done, n: int,
           rng: np.random.Generator) -> tuple[list[tuple[np.ndarray, dict]], Surrogate]:
    """One round's plans to verify, each with its user attrs: the surrogate's (or, in mode
    ``local``, the sensitivities') proposals first, then NSGA-II's children of the verified plans;
    and the round's global fit (it predicts ``predicted_kl`` for plans that were not proposed)."""
    G = len(tables.groups)
    genomes = _genomes(done) if done else np.zeros((0, G), dtype=np.int64)
    kls = np.array([t.values[0] for t in done])
    seen = {g.tobytes() for g in genomes}
    out: list[tuple[np.ndarray, dict]] = []
    surrogate = Surrogate(tables)
    if cfg.mode in ("surrogate", "local"):
        if cfg.mode == "surrogate":
            surrogate.fit(genomes, kls)
        n_model = max(1, int(round(n * SURROGATE_SHARE)))
        feasible = [i for i, t in enumerate(done) if t.user_attrs.get("feasible")]
        proposals: list[tuple[np.ndarray, float, str]] = []
        if feasible and (surrogate.model is not None or cfg.mode == "local"):
            incumbent = genomes[min(feasible, key=lambda i: kls[i])]
            local = Surrogate(tables).fit_local(genomes, kls, incumbent) if cfg.mode == "surrogate" else surrogate
            k = (n_model + 1) // 2 if cfg.mode == "surrogate" else n_model
            proposals += [(g, p, "local") for g, p in local.propose_local(k, cfg.budget, incumbent, seen)]
            seen |= {g.tobytes() for g, _, _ in proposals}
        if cfg.mode == "surrogate" or not proposals:
            proposals += [(g, p, "global") for g, p in surrogate.propose(n_model - len(proposals), cfg.budget, seen)]
        seen |= {g.tobytes() for g, _, _ in proposals}
        out += [(g, {"source": cfg.mode if cfg.mode == "local" else "surrogate", "proposal": kind,
                     "predicted_kl": pred}) for g, pred, kind in proposals]
    rest = n - len(out)
    if rest > 0:
        if len(done) >= 2:
            avg = tables.avg_bits(genomes)
            F = np.column_stack([kls, avg])
            children = offspring(genomes, F, np.maximum(avg - cfg.budget, 0), 4 * rest, tables.n_choices, rng)
        else:  # NSGA-II's first generation: random plans
            children = rng.integers(0, tables.n_choices, size=(4 * rest, G))
        for child in children:
            if child.tobytes() not in seen and rest > 0:
                seen.add(child.tobytes())
                out.append((child, {"source": "nsga2", "predicted_kl": float(surrogate.predict(child)[0])}))
                rest -= 1
    return out, surrogate


def search(cfg: SearchConfig, groups: list[Group], prep: Prepared, storage, space_name: str | None = None,
           started: float | None = None, timings: dict[str, float] | None = None) -> SearchState:
    """Stages 3 and 4 (module docstring) on what ``_prepare`` gave."""
    started = started or time.time()
    timings = dict(timings or {})
    name = cfg.study or default_study_name(cfg.model, cfg.budget)
    out = Path(cfg.out) if cfg.out else Path("studies") / name
    ev = prep.evaluator
    t, before = time.time(), ev.evaluations
    tables, method = _sensitivity_tables(cfg, groups, prep, _recorded_method(storage, name))
    evaluations = {"sensitivity": ev.evaluations - before}
    timings["measured sensitivity"] = time.time() - t
    t = time.time()
    baseline_genomes = _baselines(cfg, groups, prep, tables)
    timings["baselines (heuristics, exact knapsack)"] = time.time() - t
    fp_ppl = ev.reference("select").ppl

    # -- the study ----------------------------------------------------------------------------
    def sampler(seed: int) -> optuna.samplers.BaseSampler:
        # Every trial's plan is enqueued (or, in random mode, drawn in the objective): the sampler
        # samples no parameter. Passed explicitly all the same (Optuna 5 defaults to TPE).
        return (optuna.samplers.RandomSampler(seed=seed) if cfg.mode == "random"
                else optuna.samplers.NSGAIISampler(seed=seed, population_size=max(10, cfg.round_size)))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, created = _open_study(name, storage, sampler(cfg.seed))
    worker = f"{socket.gethostname()}:{os.getpid()}"
    # Workers that join a study draw other random numbers than its creator, or they would all
    # propose the same plans; the creator's run stays reproducible from --seed.
    salt = 0 if created else zlib.crc32(worker.encode()) % 1_000_003
    rng = np.random.default_rng(cfg.seed + salt)
    with warnings.catch_warnings():  # experimental since Optuna 3.2, and what optuna-dashboard reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["KL", "avg_bits"])
    quant = prep.settings.to_dict()
    for key, value in {"budget": cfg.budget, "model": str(cfg.model), "space": space_name,
                       "target": cfg.target, "groups": len(groups), "quant": quant,
                       "sensitivity": method}.items():
        study.set_user_attr(key, value)
    _enqueue_baselines(study, baseline_genomes, created)
    # What optuna-dashboard shows: figures, note and artifacts (paretoq/dashboard.py).
    pub = dashboard.Publisher(study, cfg.storage or DEFAULT_STORAGE, out, prep.adapter, cfg.budget, fp_ppl=fp_ppl,
                              model=prep.model_info, baselines=baseline_genomes, groups=groups)
    children = _spawn_workers(cfg, name) if cfg.jobs > 1 and not cfg.worker else []
    prior = Surrogate(tables)
    fitted = {"model": prior}  # the global fit of the latest round, for predicted_kl of unqueued plans
    # A streamed model reads every layer anew for each walk: measuring the held-out windows in the
    # same walk costs their compute only, where a held-out stage after the search would read the
    # model once more per plan (44% of a 10-trial search at Qwen3-30B-A3B's shape, docs/scale.md).
    fold_test = bool(getattr(ev, "streams", False))

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        trials = study.get_trials(deepcopy=False, states=(COMPLETE, RUNNING, WAITING))
        me = next(t for t in trials if t.number == trial.number)  # the frozen view has system attrs
        if sum(t.state != WAITING and t.number != trial.number for t in trials) >= cfg.trials:
            _give_back(study, me)  # another worker took the last trial meanwhile
            raise optuna.TrialPruned("the study has its trials; this worker stops")
        if "failed_trial" not in me.system_attrs and any(
                t.state == WAITING and "failed_trial" in t.system_attrs for t in trials):
            # A dead worker's plan waits to be retried: it goes first, or the study could reach
            # its trial count and never verify it. Optuna pops the oldest waiting trial, so this
            # one steps back in the queue.
            _give_back(study, me)
            raise optuna.TrialPruned("a retried plan goes first")
        if str(me.user_attrs.get("source", "")).startswith("baseline:") and "failed_trial" not in me.system_attrs and any(
                t.number < me.number and t.user_attrs.get("genome") == me.user_attrs.get("genome") for t in trials):
            # Workers started together can each find the study without baselines and enqueue them
            # (`_enqueue_baselines`): the plan is verified once, by the copy queued first.
            raise optuna.TrialPruned("an earlier trial verifies this baseline's plan")
        trial.set_user_attr("worker", worker)  # which process verifies it, for whoever inspects the study
        text = trial.user_attrs.get("genome")
        if text is None:  # nothing queued for this worker (random mode, or another worker took it): a random plan
            genome = np.random.default_rng([cfg.seed, salt, trial.number]).integers(0, tables.n_choices)
            trial.set_user_attr("genome", encode_genome(genome))
            trial.set_user_attr("source", "random")
        else:
            genome = decode_genome(text)
        comp_bits = component_bits(groups, tables.plan_bits(genome))
        plan = Plan(comp_bits, prep.settings)
        try:
            if fold_test:  # the held-out windows ride along the walk; nothing selects on them
                both = ev.evaluate_parts(comp_bits, ("select", "test"))
                r, held = both["select"], both["test"]
            else:
                r, held = ev.evaluate(comp_bits, "select"), None
        except KeyboardInterrupt:  # Optuna fails this trial; an enqueued plan goes back in the queue
            _give_back(study, me)
            raise
        if not (math.isfinite(r.kl) and math.isfinite(r.ppl)):
            trial.set_user_attr("fail_reason", f"evaluation gave KL={r.kl}, perplexity={r.ppl}")
            raise NonFiniteEvaluation(f"trial {trial.number}: evaluation gave KL={r.kl}, perplexity={r.ppl}")
        avg = float(tables.avg_bits(genome[None])[0])
        # The constraint, written once, in the list form that both Optuna's samplers and
        # optuna-dashboard read (Trial.set_constraint writes another key, which the dashboard ignores
        # and Optuna would count as a second constraint beside this one).
        trial.storage.set_trial_system_attr(trial._trial_id, "constraints", [avg - cfg.budget])
        attrs = {"avg_bits": avg, "effective_bits": plan.effective_bits(prep.adapter, over="plan"),
                 "size_bytes": plan.size_bytes(prep.adapter), "kl": r.kl, "ppl": r.ppl, "agreement": r.agreement,
                 "feasible": avg <= cfg.budget + 1e-9, "kl_windows": [float(f"{x:.6g}") for x in r.kl_windows]}
        if held is not None:
            attrs["held_out"] = _held_out_metrics(held)
        if "source" not in trial.user_attrs:
            attrs["source"] = "random"
        if "predicted_kl" not in trial.user_attrs:
            attrs["predicted_kl"] = float(fitted["model"].predict(genome)[0])
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        pub.on_trial(trial, plan)
        return r.kl, avg

    bar = tqdm(total=cfg.trials, initial=min(len(report.completed(study)), cfg.trials), desc="search", unit="trial",
               disable=not cfg.progress)
    best_kl = min((t.values[0] for t in report.completed(study) if t.user_attrs.get("feasible")), default=math.inf)
    failures = 0  # this worker's failed trials in a row

    def on_trial(study_, trial_: optuna.trial.FrozenTrial) -> None:
        nonlocal best_kl, failures
        failures = failures + 1 if trial_.state == optuna.trial.TrialState.FAIL else 0
        if trial_.state != COMPLETE:
            return
        bar.update(1)
        if trial_.user_attrs.get("feasible"):
            best_kl = min(best_kl, trial_.values[0])
        if best_kl < math.inf:
            bar.set_postfix(best_kl=f"{best_kl:.4g}")

    t, before = time.time(), ev.evaluations
    deadline = started + cfg.timeout if cfg.timeout else None
    round_no, interrupted, published = 0, False, 0
    try:
        while deadline is None or time.time() < deadline:
            trials = study.get_trials(deepcopy=False)
            n_done = sum(t.state == COMPLETE for t in trials)
            if n_done >= cfg.trials:
                break
            if n_done + sum(t.state == RUNNING for t in trials) >= cfg.trials:
                # The rest is running on other workers: wait; a dead worker's trial fails as stale
                # and comes back to the queue.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
                time.sleep(min(2.0, cfg.heartbeat))
                continue
            if n_done - published >= cfg.round_size:  # figures and note in the dashboard, as it runs
                pub.on_round()
                published = n_done
            if cfg.mode != "random" and not any(t.state == WAITING for t in trials):
                done = [t for t in trials if t.state == COMPLETE]
                plans, fitted["model"] = _round(cfg, tables, done, min(cfg.round_size, cfg.trials - n_done), rng)
                for genome, attrs in plans:
                    study.enqueue_trial({}, user_attrs={**attrs, "genome": encode_genome(genome),
                                                        "round": f"{worker}/{round_no}"})
                round_no += 1
            study.optimize(objective, n_trials=1, callbacks=[on_trial], catch=(NonFiniteEvaluation,))
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise ParetoqError(f"{failures} trials in a row failed (see their fail_reason); check the model "
                                   "and the calibration data")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()
        for child in children:  # they stop by themselves at the trial count; on an interrupt, stop them
            if interrupted:
                child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=None if not interrupted else 60)
            except subprocess.TimeoutExpired:
                child.kill()
    evaluations["verified trials"] = ev.evaluations - before
    timings["verified trials"] = time.time() - t
    done = report.completed(study)
    names = pub.baseline_trials(done)
    feasible = [t for t in done if t.user_attrs.get("feasible")]
    best = min(feasible, key=lambda t: t.values[0]) if feasible else None
    best, kept = _keep_the_knapsack(best, feasible, names)
    held_out: dict[int, dict] = {}
    if not cfg.worker and not interrupted:
        t, before = time.time(), ev.evaluations
        held_out = _held_out(study, done, best, names, groups, tables, ev)
        evaluations["held-out re-measurement"] = ev.evaluations - before
        timings["held-out re-measurement"] = time.time() - t
    plan = None
    if best is not None:
        test = held_out.get(best.number, {})
        plan = Plan(component_bits(groups, tables.plan_bits(decode_genome(best.user_attrs["genome"]))), prep.settings,
                    model=prep.model_info, budget=cfg.budget,
                    metrics={"kl": best.values[0], "kl_test": test.get("kl"), "ppl": best.user_attrs["ppl"],
                             "ppl_test": test.get("ppl"), "ppl_fp": fp_ppl,
                             "ppl_fp_test": ev.reference("test").ppl if test else None,
                             "agreement": best.user_attrs["agreement"], "agreement_test": test.get("agreement"),
                             "trial": best.number, "source": best.user_attrs.get("source"), **kept})
    timings["total"] = time.time() - started
    state = SearchState(cfg, study, groups, plan, names, fp_ppl, out, timings, _kendall_taus(done), interrupted,
                        held_out, ev.reference("test").ppl if held_out else math.nan, evaluations)
    if not cfg.worker:
        report.write_outputs(state, prep.adapter)
        pub.on_finish(prep.features)
    return state


def gain_within_noise(best: list[float], anchor: list[float], candidates: int) -> tuple[bool, float, float]:
    """Whether ``best``'s lower KL than ``anchor`` on the same windows could be the luck of choosing
    the best of ``candidates`` plans: (within noise, mean gain per window, the gain that would count).

    The gain counts when the mean paired difference exceeds sqrt(2 ln m) standard errors: the
    expected largest of m standard normal draws is below that, so the best of m plans no better than
    the anchor rarely clears it by chance. Fewer than two windows, or windows that do not pair (a
    study resumed from trials recorded before ``kl_windows`` existed): nothing can be judged, so no.
    """
    if len(best) != len(anchor) or len(best) < 2:
        return False, 0.0, 0.0
    d = np.asarray(anchor, dtype=np.float64) - np.asarray(best, dtype=np.float64)
    threshold = math.sqrt(2 * math.log(max(candidates, 2))) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return bool(d.mean() <= threshold), float(d.mean()), threshold


def _keep_the_knapsack(best, feasible: list, baselines: dict[str, int]) -> tuple[object, dict]:
    """The plan to return: the best feasible trial on the selection windows, unless its lead over the
    exact knapsack is within the noise of picking the best of every searched candidate; then the
    knapsack's plan, which needed no selection (the held-out study showed the best trial's lead on
    the selection windows, 3-18% on the demo, partly gone on held-out windows)."""
    anchor = next((t for t in feasible if t.number == baselines.get("knapsack")), None)
    if best is None or anchor is None or best.number == anchor.number:
        return best, {}
    searched = sum(not str(t.user_attrs.get("source", "")).startswith("baseline:") for t in feasible)
    within, gain, threshold = gain_within_noise(best.user_attrs.get("kl_windows", []),
                                                anchor.user_attrs.get("kl_windows", []), searched)
    if not within:
        return best, {}
    return anchor, {"kept_knapsack_over": {"trial": best.number, "kl": best.values[0], "gain_per_window": gain,
                                           "gain_needed": threshold}}


def _held_out_metrics(r) -> dict:
    """What a plan's held-out measurement keeps, whether a trial's walk or the held-out stage made it."""
    return {"kl": r.kl, "ppl": r.ppl, "agreement": r.agreement}


def _held_out(study: optuna.Study, done, best, baseline_trials: dict[str, int], groups: list[Group], tables: Tables,
              evaluator) -> dict[int, dict]:
    """Trial number -> KL, perplexity and agreement on the held-out windows, for the best plan, every
    point of the front of all trials and of the front of non-baseline trials, and every baseline.
    Kept in the study (user attr ``held_out``), so a resumed search measures only what is new."""
    stored = {int(k): v for k, v in study.user_attrs.get("held_out", {}).items()}
    searched = [t for t in done if not str(t.user_attrs.get("source", "")).startswith("baseline:")]
    want = {t.number for t in report.front_of(done)} | {t.number for t in report.front_of(searched)}
    want |= set(baseline_trials.values()) | ({best.number} if best is not None else set())
    by_number = {t.number: t for t in done}
    for n in sorted(want - set(stored)):
        if "held_out" in by_number[n].user_attrs:  # measured in the trial's own walk (a streamed model)
            stored[n] = by_number[n].user_attrs["held_out"]
            continue
        genome = decode_genome(by_number[n].user_attrs["genome"])
        r = evaluator.evaluate(component_bits(groups, tables.plan_bits(genome)), "test")
        stored[n] = _held_out_metrics(r)
    study.set_user_attr("held_out", {str(k): v for k, v in stored.items()})
    return stored
