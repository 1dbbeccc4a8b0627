"""`paretoq search`: the Optuna study and its verify loop.

Setup (each step cached on disk): capture, probe features, the quant cache at every width, the
full-precision reference, and the measured sensitivity of every group. Then an Optuna study with
two objectives (KL, average bits), both minimised, the budget as a constraint and NSGA-II passed
explicitly. The seed papers' baselines and the knapsack are enqueued first, tagged. Then rounds:
refit the surrogate on every verified trial; enqueue the plans one exchange away from the best
verified plan that a fit weighted towards it predicts best (a trust region: the local proposals),
and the best plans NSGA-II finds on the global fit, spread along the front (the global proposals);
let Optuna's own NSGA-II propose the rest of the round (exploration). Every trial is a real evaluation of a plan assembled from the quant cache.
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
from paretoq.data import (DEFAULT_CALIB_TOKENS, DEFAULT_EVAL_TOKENS, DEFAULT_SEQ_LEN, TokenSet, load_token_sets,
                          read_documents)
from paretoq.errors import ParetoqError
from paretoq.evaluate import StreamedEvaluator
from paretoq.export.targets import target_space
from paretoq.models import load_model
from paretoq.plan import Plan, check_budget
from paretoq.probes.sensitivity import measure_sensitivity
from paretoq.quant.quantizer import QuantSettings
from paretoq.storage import DEFAULT_STORAGE, HEARTBEAT_SECONDS, open_storage
from paretoq.space import Group, component_bits, load_space, make_groups, min_max_bits, restrict_bits
from paretoq.surrogate import Surrogate, build_tables, kendall_tau
from paretoq.walk import open_model

MODES = ("surrogate", "nsga2", "random")
SURROGATE_SHARE = 0.7  # of each round; the rest is Optuna's NSGA-II exploring on its own
MAX_CONSECUTIVE_FAILURES = 10  # failed trials in a row before the search gives up
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


def default_study_name(model: str, budget: float) -> str:
    return f"{Path(str(model)).name or 'model'}-{budget:g}bit"


def _genome_params(groups: list[Group], bits: dict[str, int]) -> dict[str, int]:
    return {g.name: g.choices.index(bits[g.name]) for g in groups}


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


def _spawn_workers(cfg: SearchConfig, name: str) -> list[subprocess.Popen]:
    """``--jobs N``: N-1 more worker processes of this search on the same study."""
    args = [sys.executable, "-m", "paretoq.cli", "search", "--worker", "--jobs", str(cfg.jobs),
            "--budget", str(cfg.budget), "--model", str(cfg.model), "--calib", str(cfg.calib), "--space", cfg.space,
            "--trials", str(cfg.trials), "--seed", str(cfg.seed), "--study", name, "--mode", cfg.mode,
            "--calib-tokens", str(cfg.calib_tokens), "--eval-tokens", str(cfg.eval_tokens),
            "--seq-len", str(cfg.seq_len), "--device", cfg.device, "--heartbeat", str(cfg.heartbeat),
            "--storage", cfg.storage or DEFAULT_STORAGE]
    args += ["--bits", ",".join(map(str, cfg.bits))] if cfg.bits else []
    args += ["--timeout", str(cfg.timeout)] if cfg.timeout else []
    args += ["--trust-remote-code"] if cfg.trust_remote_code else []
    args += ["--dtype", cfg.dtype] if cfg.dtype else []
    args += ["--max-memory", str(cfg.max_memory)] if cfg.max_memory is not None else []
    args += ["--target", cfg.target] if cfg.target else []
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


def _enqueue_baselines(study: optuna.Study, groups: list[Group], baseline_bits: dict[str, dict[str, int]],
                       created: bool) -> None:
    """Baselines are enqueued once per study: by the worker that created it. A later run enqueues
    what is missing only when the creator never finished (no ``baselines_enqueued`` mark) and no
    other worker is active, so workers started together never enqueue twice."""
    if not baseline_bits or study.user_attrs.get("baselines_enqueued"):
        return
    if not created and any(t.state in (RUNNING, WAITING) for t in study.get_trials(deepcopy=False)):
        return
    existing = {t.user_attrs.get("source") for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.FAIL}
    for bname, bits in baseline_bits.items():
        if f"baseline:{bname}" not in existing:
            study.enqueue_trial(_genome_params(groups, bits), user_attrs={"source": f"baseline:{bname}"})
    study.set_user_attr("baselines_enqueued", True)


def _give_back(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Put a plan that was queued (a baseline, a proposal, a retry) back in the queue, as Optuna's
    retry callback does, so a trial this worker gives up is verified later, by it or another."""
    if not trial.params and "fixed_params" not in trial.system_attrs:
        return  # sampled on the spot: nothing was promised
    study.add_trial(optuna.create_trial(
        state=WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs={k: v for k, v in trial.user_attrs.items() if k != "worker"}, system_attrs=dict(trial.system_attrs)))


def _propose(surrogate: Surrogate, tables, groups: list[Group], done, cfg: SearchConfig, room: int,
             round_no: int) -> list[tuple[np.ndarray, float, str]]:
    """One round's surrogate proposals: local ones around the incumbent, then global ones."""
    genomes = np.array([[t.params[g.name] for g in groups] for t in done]) if done else np.zeros((0, len(groups)), int)
    kls = np.array([t.values[0] for t in done])
    surrogate.fit(genomes, kls)
    seen = {gnm.astype(np.int64).tobytes() for gnm in genomes}
    n = max(1, int(round(room * SURROGATE_SHARE)))
    proposals: list[tuple[np.ndarray, float, str]] = []
    feasible = [i for i, t in enumerate(done) if t.user_attrs.get("feasible")]
    if feasible and surrogate.model is not None:
        incumbent = genomes[min(feasible, key=lambda i: kls[i])]
        local = Surrogate(tables).fit_local(genomes, kls, incumbent)
        proposals += [(g, p, "local") for g, p in local.propose_local((n + 1) // 2, cfg.budget, incumbent, seen)]
        seen |= {g.astype(np.int64).tobytes() for g, _, _ in proposals}
    init = genomes[np.argsort(kls)] if len(done) else None
    proposals += [(g, p, "global") for g, p in
                  surrogate.propose(n - len(proposals), cfg.budget, seen, seed=cfg.seed + len(done) + round_no, init=init)]
    return proposals


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


def run_search(cfg: SearchConfig) -> SearchState:
    started = time.time()
    timings: dict[str, float] = {}
    check_budget(cfg.budget)
    if cfg.mode not in MODES:
        raise ParetoqError(f"unknown search mode {cfg.mode!r}; use one of {', '.join(MODES)}")
    if cfg.jobs < 1:
        raise ParetoqError(f"--jobs must be at least 1, got {cfg.jobs}")
    if cfg.heartbeat < 1:
        raise ParetoqError(f"--heartbeat must be at least 1 second, got {cfg.heartbeat}")
    space = restrict_bits(load_space(cfg.space), cfg.bits)
    space = target_space(space, cfg.target, cfg.budget)
    docs = read_documents(cfg.calib)
    # Shapes alone decide the groups: check the space against the budget before loading any weight.
    meta = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, weights=False)
    groups = make_groups(meta.adapter, space)
    if not groups:
        raise ParetoqError(f"search space {space.name!r} selects no component of this model; check its 'bits' kinds")
    lo, _ = min_max_bits(groups)
    if cfg.budget < lo - 1e-9:
        raise ParetoqError(f"budget {cfg.budget:g} is below the smallest plan of this space ({lo:.3f} bits); raise --budget")
    name = cfg.study or default_study_name(cfg.model, cfg.budget)
    out = Path(cfg.out) if cfg.out else Path("studies") / name
    if not cfg.worker:
        _check_writable(out)
    if cfg.jobs > 1:  # share the cores with the other workers of this machine (this one included)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.jobs))
    sm = open_model(cfg.model, dtype=cfg.dtype, device=cfg.device, max_memory=cfg.max_memory,
                    trust_remote_code=cfg.trust_remote_code)
    loaded = sm.loaded

    # -- setup: one walk over the layers fills every cache (capture, features, quant, reference) ---
    t = time.time()
    sets = load_token_sets(loaded.tokenizer, cfg.calib, cfg.calib_tokens, cfg.eval_tokens, cfg.seq_len, cfg.seed,
                           documents=docs)
    storage = open_storage(cfg.storage, cfg.heartbeat)  # a bad URL fails now, before the long work
    n_sens = max(1, math.ceil(cfg.sensitivity_tokens / cfg.seq_len))
    parts = {"eval": sets.eval, "sensitivity": TokenSet(sets.eval.input_ids[:n_sens], sets.eval.source)}
    settings = QuantSettings()
    widths = tuple(sorted({b for g in groups for b in g.choices}))
    prep = prepare(sm, sets.calib, parts, settings, widths, seed=cfg.seed, use_cache=cfg.use_cache,
                   progress=cfg.progress)
    features, cache, cap_key = prep.features, prep.cache, prep.capture_key
    evaluator = StreamedEvaluator(sm, cache.weight, parts, prep.references)
    ref = evaluator.reference("eval")
    timings["setup (capture, probes, quant cache, reference)"] = time.time() - t
    t = time.time()
    sensitivity = measure_sensitivity(lambda bits: evaluator.evaluate(bits, "sensitivity").kl, groups,
                                      progress=cfg.progress,
                                      cache_key=f"{cap_key}/{settings.to_dict()}/{parts['sensitivity'].fingerprint()}")
    timings["measured sensitivity"] = time.time() - t
    by_key = features.by_key()
    usage = {g.name: float(np.mean([by_key[k].usage for k in g.keys])) for g in groups}
    tables = build_tables(groups, sensitivity, cache.loss, usage)
    surrogate = Surrogate(tables)

    # -- the study ----------------------------------------------------------------------------
    def sampler(seed: int) -> optuna.samplers.BaseSampler:
        return (optuna.samplers.RandomSampler(seed=seed) if cfg.mode == "random"
                else optuna.samplers.NSGAIISampler(seed=seed, population_size=max(10, cfg.round_size)))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    baseline_bits: dict[str, dict[str, int]] = {}
    if cfg.with_baselines:  # computed before the study exists, so its creator enqueues them at once
        baseline_bits = bl.heuristics(groups, features, cfg.budget)
        baseline_bits["knapsack"] = bl.knapsack(groups, sensitivity, cfg.budget)
    study, created = _open_study(name, storage, sampler(cfg.seed))
    worker = f"{socket.gethostname()}:{os.getpid()}"
    # Workers that join a study draw other random numbers than its creator, or they would all
    # propose the same plans; the creator's run stays reproducible from --seed.
    salt = 0 if created else zlib.crc32(worker.encode()) % 1_000_003
    if salt:
        study.sampler = sampler(cfg.seed + salt)
    with warnings.catch_warnings():  # experimental since Optuna 3.2, and what optuna-dashboard reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["KL", "avg_bits"])
    for key, value in {"budget": cfg.budget, "model": str(cfg.model), "space": space.name,
                       "target": cfg.target}.items():
        study.set_user_attr(key, value)
    _enqueue_baselines(study, groups, baseline_bits, created)
    # What optuna-dashboard shows: figures, note and artifacts (paretoq/dashboard.py).
    pub = dashboard.Publisher(study, cfg.storage or DEFAULT_STORAGE, out, loaded.adapter, cfg.budget, fp_ppl=ref.ppl,
                              model={"name_or_path": str(cfg.model), "model_type": loaded.model.config.model_type},
                              baselines={b: _genome_params(groups, bits) for b, bits in baseline_bits.items()})
    children = _spawn_workers(cfg, name) if cfg.jobs > 1 and not cfg.worker else []

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
        idx = {g.name: trial.suggest_int(g.name, 0, len(g.choices) - 1) for g in groups}
        trial.set_user_attr("worker", worker)  # which process verifies it, for whoever inspects the study
        genome = np.array([idx[g.name] for g in groups])
        comp_bits = component_bits(groups, tables.plan_bits(genome))
        plan = Plan(comp_bits, settings)
        try:
            r = evaluator.evaluate(comp_bits, "eval")
        except KeyboardInterrupt:  # Optuna fails this trial; an enqueued plan goes back in the queue
            _give_back(study, me)
            raise
        if not (math.isfinite(r.kl) and math.isfinite(r.ppl)):
            trial.set_user_attr("fail_reason", f"evaluation gave KL={r.kl}, perplexity={r.ppl}")
            raise NonFiniteEvaluation(f"trial {trial.number}: evaluation gave KL={r.kl}, perplexity={r.ppl}")
        avg = plan.avg_bits(loaded.adapter, over="plan")  # the budget is over the space's components
        trial.set_constraint("budget", avg - cfg.budget)
        source = trial.user_attrs.get("source") or ("random" if cfg.mode == "random" else "nsga2")
        attrs = {"source": source, "avg_bits": avg, "effective_bits": plan.effective_bits(loaded.adapter, over="plan"),
                 "size_bytes": plan.size_bytes(loaded.adapter), "kl": r.kl, "ppl": r.ppl, "agreement": r.agreement,
                 "feasible": avg <= cfg.budget + 1e-9}
        if "predicted_kl" not in trial.user_attrs:
            attrs["predicted_kl"] = float(surrogate.predict(genome)[0])
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        pub.on_trial(trial, plan)
        return r.kl, avg

    done = report.completed(study)
    bar = tqdm(total=cfg.trials, initial=min(len(done), cfg.trials), desc="search", unit="trial",
               disable=not cfg.progress)
    best_kl = min((t.values[0] for t in done if t.user_attrs.get("feasible")), default=math.inf)

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

    t = time.time()
    deadline = started + cfg.timeout if cfg.timeout else None
    round_no, explore_left, interrupted = 0, 0, False
    published = 0
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
            waiting = any(t.state == WAITING for t in trials)
            if n_done - published >= cfg.round_size:  # figures and note in the dashboard, as it runs
                pub.on_round()
                published = n_done
            if cfg.mode == "surrogate" and not waiting and explore_left == 0:
                proposals = _propose(surrogate, tables, groups, report.completed(study), cfg,
                                     min(cfg.round_size, cfg.trials - n_done), salt + round_no)
                for genome, pred, kind in proposals:
                    study.enqueue_trial({g.name: int(i) for g, i in zip(groups, genome)},
                                        user_attrs={"source": "surrogate", "proposal": kind, "predicted_kl": pred,
                                                    "round": f"{worker}/{round_no}"})
                explore_left = max(0, cfg.round_size - len(proposals))
                round_no += 1
                waiting = bool(proposals)
            study.optimize(objective, n_trials=1, callbacks=[on_trial], catch=(NonFiniteEvaluation,))
            if not waiting:
                explore_left = max(0, explore_left - 1)
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
    timings["verified trials"] = time.time() - t
    timings["total"] = time.time() - started
    done = report.completed(study)
    taus = _kendall_taus(done)
    names = pub.baseline_trials()
    feasible = [t for t in done if t.user_attrs.get("feasible")]
    best = min(feasible, key=lambda t: t.values[0]) if feasible else None
    plan = None
    if best is not None:
        bits = tables.plan_bits(np.array([best.params[g.name] for g in groups]))
        plan = Plan(component_bits(groups, bits), settings,
                    model={"name_or_path": str(cfg.model), "model_type": loaded.model.config.model_type},
                    budget=cfg.budget, metrics={"kl": best.values[0], "ppl": best.user_attrs["ppl"],
                                                "ppl_fp": ref.ppl, "agreement": best.user_attrs["agreement"],
                                                "trial": best.number, "source": best.user_attrs.get("source")})
    state = SearchState(cfg, study, groups, plan, names, ref.ppl, out, timings, taus, interrupted)
    if not cfg.worker:
        report.write_outputs(state, loaded.adapter)
        pub.on_finish(features)
    return state
