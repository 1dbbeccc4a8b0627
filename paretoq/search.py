"""`paretoq search`: the Optuna study and its verify loop.

Setup (each step cached on disk): capture, probe features, the quant cache at every width, the
full-precision reference, and the measured sensitivity of every group. Then an Optuna study with
two objectives (KL, average bits), both minimised, the budget as a constraint and NSGA-II passed
explicitly. The seed papers' baselines and the knapsack are enqueued first, tagged. Then rounds:
refit the surrogate on every verified trial, run NSGA-II on it, enqueue its best proposals (spread
along the front) for verification, and let Optuna's own NSGA-II propose the rest of the round
(exploration). Every trial is a real evaluation of a plan assembled from the quant cache.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import optuna
from tqdm import tqdm

from paretoq import baselines as bl
from paretoq import dashboard, report
from paretoq.capture import cached_capture
from paretoq.data import (DEFAULT_CALIB_TOKENS, DEFAULT_EVAL_TOKENS, DEFAULT_SEQ_LEN, TokenSet, load_token_sets,
                          read_documents)
from paretoq.errors import ParetoqError
from paretoq.evaluate import Assembler, cached_reference, compute_reference, evaluate
from paretoq.models import load_model
from paretoq.plan import Plan, check_budget
from paretoq.probes.run import cached_features
from paretoq.probes.sensitivity import measure_sensitivity
from paretoq.quant.cache import QuantCache
from paretoq.quant.quantizer import QuantSettings
from paretoq.space import Group, component_bits, load_space, make_groups, min_max_bits, restrict_bits
from paretoq.surrogate import Surrogate, build_tables, kendall_tau

MODES = ("surrogate", "nsga2", "random")
DEFAULT_STORAGE = "sqlite:///studies/paretoq.db"
SURROGATE_SHARE = 0.7  # of each round; the rest is Optuna's NSGA-II exploring on its own


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
    round_size: int = 20
    sensitivity_tokens: int = 2048
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    eval_tokens: int = DEFAULT_EVAL_TOKENS
    seq_len: int = DEFAULT_SEQ_LEN
    jobs: int = 1
    device: str = "cpu"
    progress: bool = True
    trust_remote_code: bool = False


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
    taus: list[tuple[int, float]] = field(default_factory=list)  # (round, Kendall tau on unseen trials)


def default_study_name(model: str, budget: float) -> str:
    return f"{Path(str(model)).name or 'model'}-{budget:g}bit"


def _genome_params(groups: list[Group], bits: dict[str, int]) -> dict[str, int]:
    return {g.name: g.choices.index(bits[g.name]) for g in groups}


def run_search(cfg: SearchConfig) -> SearchState:
    started = time.time()
    timings: dict[str, float] = {}
    check_budget(cfg.budget)
    if cfg.mode not in MODES:
        raise ParetoqError(f"unknown search mode {cfg.mode!r}; use one of {', '.join(MODES)}")
    if cfg.jobs != 1:
        raise ParetoqError("--jobs above 1 is not supported yet; run several `paretoq search` processes on one --storage")
    space = restrict_bits(load_space(cfg.space), cfg.bits)
    docs = read_documents(cfg.calib)
    # Shapes alone decide the groups: check the space against the budget before loading any weight.
    meta = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code, weights=False)
    groups = make_groups(meta.adapter, space)
    if not groups:
        raise ParetoqError(f"search space {space.name!r} selects no component of this model; check its 'bits' kinds")
    lo, _ = min_max_bits(groups)
    if cfg.budget < lo - 1e-9:
        raise ParetoqError(f"budget {cfg.budget:g} is below the smallest plan of this space ({lo:.3f} bits); raise --budget")
    loaded = load_model(cfg.model, device=cfg.device, trust_remote_code=cfg.trust_remote_code)
    name = cfg.study or default_study_name(cfg.model, cfg.budget)
    out = Path(cfg.out) if cfg.out else Path("studies") / name
    storage = cfg.storage or DEFAULT_STORAGE
    if storage.startswith("sqlite:///"):
        Path(storage.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)

    # -- setup: every step cached on disk ------------------------------------------------------
    t = time.time()
    sets = load_token_sets(loaded.tokenizer, cfg.calib, cfg.calib_tokens, cfg.eval_tokens, cfg.seq_len, cfg.seed,
                           documents=docs)
    ref = cached_reference(loaded, sets.eval)
    cap, cap_key, _ = cached_capture(loaded, sets.calib, seed=cfg.seed, progress=cfg.progress)
    features = cached_features(loaded, cap, cap_key, seed=cfg.seed)
    settings = QuantSettings()
    cache = QuantCache(loaded.adapter, cap, cap_key, settings)
    cache.fill(bits=tuple(sorted({b for g in groups for b in g.choices})), progress=cfg.progress)
    timings["setup (capture, probes, quant cache, reference)"] = time.time() - t
    t = time.time()
    n_sens = max(1, math.ceil(cfg.sensitivity_tokens / cfg.seq_len))
    sens_set = TokenSet(sets.eval.input_ids[:n_sens], sets.eval.source)
    assembler = Assembler(loaded.adapter, cache.weight)
    sens_ref = compute_reference(loaded.model, sens_set)
    sensitivity = measure_sensitivity(assembler, groups, sens_ref, progress=cfg.progress,
                                      cache_key=f"{cap_key}/{settings.to_dict()}/{sens_set.fingerprint()}")
    timings["measured sensitivity"] = time.time() - t
    by_key = features.by_key()
    usage = {g.name: float(np.mean([by_key[k].usage for k in g.keys])) for g in groups}
    tables = build_tables(groups, sensitivity, cache.loss, usage)
    surrogate = Surrogate(tables)

    # -- the study ----------------------------------------------------------------------------
    sampler = (optuna.samplers.RandomSampler(seed=cfg.seed) if cfg.mode == "random"
               else optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=max(10, cfg.round_size)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, directions=["minimize", "minimize"],
                                sampler=sampler, load_if_exists=True)
    with warnings.catch_warnings():  # experimental since Optuna 3.2, and what optuna-dashboard reads
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["KL", "avg_bits"])
    study.set_user_attr("budget", cfg.budget)
    study.set_user_attr("model", str(cfg.model))
    study.set_user_attr("space", space.name)

    baseline_bits: dict[str, dict[str, int]] = {}
    if cfg.with_baselines:
        baseline_bits = bl.heuristics(groups, features, cfg.budget)
        baseline_bits["knapsack"] = bl.knapsack(groups, sensitivity, cfg.budget)
        existing = {t.user_attrs.get("source") for t in study.trials}
        for bname, bits in baseline_bits.items():
            if f"baseline:{bname}" not in existing:
                study.enqueue_trial(_genome_params(groups, bits), user_attrs={"source": f"baseline:{bname}"},
                                    skip_if_exists=True)
    # What optuna-dashboard shows: figures, note and artifacts (paretoq/dashboard.py).
    pub = dashboard.Publisher(study, storage, out, loaded.adapter, cfg.budget, fp_ppl=ref.ppl,
                              model={"name_or_path": str(cfg.model), "model_type": loaded.model.config.model_type},
                              baselines={b: _genome_params(groups, bits) for b, bits in baseline_bits.items()})

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        idx = {g.name: trial.suggest_int(g.name, 0, len(g.choices) - 1) for g in groups}
        genome = np.array([idx[g.name] for g in groups])
        comp_bits = component_bits(groups, tables.plan_bits(genome))
        plan = Plan(comp_bits, settings)
        with assembler.apply(comp_bits):
            r = evaluate(loaded.model, ref)
        avg = plan.avg_bits(loaded.adapter)
        trial.set_constraint("budget", avg - cfg.budget)
        source = trial.user_attrs.get("source") or ("random" if cfg.mode == "random" else "nsga2")
        attrs = {"source": source, "avg_bits": avg, "effective_bits": plan.effective_bits(loaded.adapter),
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

    def on_trial(study_, trial_: optuna.trial.FrozenTrial) -> None:
        nonlocal best_kl
        bar.update(1)
        if trial_.state == optuna.trial.TrialState.COMPLETE and trial_.user_attrs.get("feasible"):
            best_kl = min(best_kl, trial_.values[0])
        if best_kl < math.inf:
            bar.set_postfix(best_kl=f"{best_kl:.4g}")

    t = time.time()
    taus: list[tuple[int, float]] = []
    round_no = 0
    deadline = started + cfg.timeout if cfg.timeout else None
    try:
        while len(report.completed(study)) < cfg.trials and (deadline is None or time.time() < deadline):
            remaining = cfg.trials - len(report.completed(study))
            waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
            before = len(study.trials)  # enqueued proposals are appended as WAITING trials from here
            proposed = 0
            if cfg.mode == "surrogate" and not waiting:
                done = report.completed(study)
                genomes = np.array([[t.params[g.name] for g in groups] for t in done]) if done else np.zeros((0, len(groups)), int)
                surrogate.fit(genomes, np.array([t.values[0] for t in done]))
                seen = {gnm.astype(np.int64).tobytes() for gnm in genomes}
                init = genomes[np.argsort([t.values[0] for t in done])] if len(done) else None
                n = max(1, int(round(min(cfg.round_size, remaining) * SURROGATE_SHARE)))
                for genome, pred in surrogate.propose(n, cfg.budget, seen, seed=cfg.seed + round_no, init=init):
                    study.enqueue_trial({g.name: int(i) for g, i in zip(groups, genome)},
                                        user_attrs={"source": "surrogate", "predicted_kl": pred})
                    proposed += 1
            batch = min(remaining, max(len(waiting), cfg.round_size if cfg.mode == "surrogate" else remaining))
            study.optimize(objective, n_trials=batch, callbacks=[on_trial], catch=(),
                           timeout=None if deadline is None else max(1.0, deadline - time.time()))
            new = [t for t in study.trials[before:] if t.state == optuna.trial.TrialState.COMPLETE
                   and t.user_attrs.get("source") == "surrogate"]
            if proposed and new and surrogate.fitted_on >= 1:
                taus.append((round_no, kendall_tau([t.user_attrs["predicted_kl"] for t in new], [t.values[0] for t in new])))
            round_no += 1
            pub.on_round()
    finally:
        bar.close()
    timings["verified trials"] = time.time() - t
    timings["total"] = time.time() - started

    done = report.completed(study)
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
    state = SearchState(cfg, study, groups, plan, names, ref.ppl, out, timings, taus)
    report.write_outputs(state, loaded.adapter)
    pub.on_finish(features)
    return state
