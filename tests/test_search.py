import json

import optuna
import pytest

from paretoq.cli import main
from paretoq.search import SearchConfig, gain_within_noise, run_search


def _config(model_dir, tmp_path, **kw):
    base = dict(budget=3.0, model=str(model_dir), trials=30, round_size=10, calib_tokens=512, eval_tokens=512,
                seq_len=64, sensitivity_tokens=128, study="tiny", storage=f"sqlite:///{tmp_path}/s.db",
                out=tmp_path / "out", progress=False)
    base.update(kw)
    return SearchConfig(**base)


@pytest.mark.slow
def test_search_writes_the_outputs_and_resumes(tiny_search_model_dir, tmp_path, monkeypatch):
    state = run_search(_config(tiny_search_model_dir, tmp_path))
    import matplotlib.figure

    from paretoq import report

    legend, savefig = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: legend.extend(fig.axes[0].get_legend_handles_labels()[1]) or savefig(fig, *a, **k))
    report.plot_front(state, tmp_path / "front-again.png")
    assert {"verified front", "baselines (seed heuristics, knapsack)", "budget 3 bits"} <= set(legend)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["artifacts", "front.json", "front.png", "plan.json", "report.md"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["format"] == "paretoq.plan/1" and plan["avg_bits"] <= 3.0 and plan["budget"] == 3.0
    assert set(plan["metrics"]) >= {"kl", "ppl", "ppl_fp", "agreement"}
    front = json.loads((out / "front.json").read_text())
    assert all(set(p) >= {"avg_bits", "kl", "source", "trial"} for p in front["front"])
    names = {b["name"] for b in front["baselines"]}
    assert {"uniform-2", "uniform-3", "knapsack", "MoQa", "+Attn"} <= names
    # Claims stand on the search's own trials and on held-out windows: every point of the front of
    # non-baseline trials, every baseline and the plan carry a held-out KL, and the search's front
    # dominates uniform 3-bit GPTQ on it (at 3.0 bits, the budget; uniform-2 is the only plan at 2.0
    # bits). Over all trials this held by construction, the uniform plans being trials; here it can fail.
    search_front = front["search_front"]
    assert search_front and not any(p["source"].startswith("baseline:") for p in search_front)
    assert all(p["kl_test"] is not None and p["kl_test"] >= 0 for p in search_front + front["baselines"] + front["front"])
    assert plan["metrics"]["kl_test"] is not None and plan["metrics"]["ppl_fp_test"] is not None
    by_name = {b["name"]: b for b in front["baselines"]}
    u3 = by_name["uniform-3"]
    assert any(p["avg_bits"] <= u3["avg_bits"] + 1e-9 and p["kl_test"] <= u3["kl_test"] for p in search_front), \
        (u3, search_front)
    from paretoq.report import claims

    c = claims(front)
    assert c["uniform_dominated"]["uniform-3"] and c["best"]["kl_test"] < by_name["uniform-2"]["kl_test"]
    report = (out / "report.md").read_text()
    assert "held out" in report and "## Claims (held-out windows, non-baseline trials)" in report
    # the held-out windows are not the selection windows: the numbers differ
    assert plan["metrics"]["kl_test"] != plan["metrics"]["kl"]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/s.db")
    assert study.metric_names == ["KL", "avg_bits"]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 30
    for t in done:
        assert set(t.user_attrs) >= {"source", "avg_bits", "effective_bits", "size_bytes", "kl", "ppl", "agreement",
                                     "predicted_kl", "feasible", "genome"}
        assert t.user_attrs["feasible"] == (t.values[1] <= 3.0 + 1e-9)
        # one compact genome per trial, no Optuna parameter per group; the budget constraint once
        assert t.params == {} and len(t.user_attrs["genome"]) == len(state.groups)
        assert t.constraints == {"0": pytest.approx(t.values[1] - 3.0)}
        # each window's KL, the paired evidence for the returned plan: their mean is the trial's KL
        assert sum(t.user_attrs["kl_windows"]) / len(t.user_attrs["kl_windows"]) == pytest.approx(t.values[0], rel=1e-4)
    # the plan is the best feasible trial, or the knapsack when that trial's lead is within the noise
    feasible = [t for t in done if t.user_attrs["feasible"]]
    best = min(feasible, key=lambda t: t.values[0])
    knapsack = next(t for t in done if t.user_attrs["source"] == "baseline:knapsack")
    searched = sum(not t.user_attrs["source"].startswith("baseline:") for t in feasible)
    within = gain_within_noise(best.user_attrs["kl_windows"], knapsack.user_attrs["kl_windows"], searched)[0]
    kept = best.number != knapsack.number and within
    assert plan["metrics"]["trial"] == (knapsack.number if kept else best.number)
    assert ("kept_knapsack_over" in plan["metrics"]) == kept
    sources = [t.user_attrs["source"] for t in done]
    assert "surrogate" in sources and "nsga2" in sources
    assert len([s for s in sources if s == "baseline:knapsack"]) == 1
    assert sources[0] == "baseline:knapsack"  # queued first: a search of few trials still measures it
    # tying: components of one group always share a width
    groups = {g.name: g for g in state.groups}
    bits = json.loads((out / "plan.json").read_text())["bits"]
    for g in groups.values():
        assert len({bits[k] for k in g.keys}) == 1
    # resuming the same study continues its trial count, baselines not repeated
    run_search(_config(tiny_search_model_dir, tmp_path, trials=36))
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/s.db")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 36
    assert [t.user_attrs["source"] for t in done].count("baseline:knapsack") == 1
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]


def test_a_lead_counts_beyond_the_noise_of_choosing_among_candidates():
    """sqrt(2 ln m) standard errors of the paired per-window differences, worked by hand."""
    anchor = [1.0, 1.0]
    best = [0.0, -2.0]  # gains 1 and 3: mean 2, sd sqrt(2), standard error 1
    within, gain, needed = gain_within_noise(best, anchor, candidates=10)
    assert gain == pytest.approx(2.0) and needed == pytest.approx((2 * __import__("math").log(10)) ** 0.5)
    assert within  # 2 < 2.146: the best of 10 could lead by that much by luck
    assert not gain_within_noise(best, anchor, candidates=2)[0]  # 2 > 1.177
    assert gain_within_noise(anchor, anchor, candidates=50)[0]  # no lead at all
    assert not gain_within_noise([0.5, 0.5, 0.5], [1.0, 1.0, 1.0], candidates=1000)[0]  # a lead on every window
    assert not gain_within_noise([0.5], [1.0], candidates=3)[0]  # one window: nothing to judge, the best stands
    assert not gain_within_noise([], [1.0, 1.0], candidates=3)[0]  # a trial from before kl_windows: unpaired


@pytest.mark.parametrize("argv, message", [
    (["--budget", "1.5"], "budget 1.5 is outside the bit choices; pass a number between 2 and 8"),
    (["--budget", "9"], "pass a number between 2 and 8"),
    (["--space", "nope"], "unknown search space 'nope'"),
    (["--bits", "3", "--space", "default", "--budget", "2.5"], "budget 2.5 is below the smallest plan"),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, message):
    assert main(["search", "--out", str(tmp_path / "o"), "--storage", f"sqlite:///{tmp_path}/s.db", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_baselines_with_one_plan_share_one_trial(monkeypatch):
    """Heuristics that give the same plan are verified once, the knapsack first; a resume adds none."""
    from paretoq import search
    from paretoq.search import _enqueue_baselines

    monkeypatch.setattr(search, "BASELINE_WAIT_SECONDS", 0.0)

    study = optuna.create_study(directions=["minimize", "minimize"])
    genomes = {"knapsack": "012", "uniform-2": "000", "+Attn": "012", "MoQa": "000", "MoQE": "111"}
    _enqueue_baselines(study, genomes, created=True)
    queued = [(t.user_attrs["source"], t.user_attrs["genome"]) for t in study.get_trials(deepcopy=False)]
    assert queued == [("baseline:knapsack", "012"), ("baseline:uniform-2", "000"), ("baseline:MoQE", "111")]
    study.set_user_attr("baselines_enqueued", False)  # as if its creator had died before marking it
    _enqueue_baselines(study, genomes, created=False)
    assert len(study.get_trials(deepcopy=False)) == 3


def test_a_streamed_search_measures_the_held_out_windows_in_each_trials_walk(tiny_search_model_dir, tmp_path):
    """With the model streamed, each trial's walk measures the held-out windows too (read once, not
    once more after the search): no held-out stage is left, and its figures are those the resident
    search's held-out stage measures for the same plans."""
    resident = run_search(_config(tiny_search_model_dir, tmp_path, trials=14, study="resident"))
    streamed = run_search(_config(tiny_search_model_dir, tmp_path, trials=14, study="streamed", max_memory=0))
    assert resident.evaluations["held-out re-measurement"] > 0
    assert streamed.evaluations["held-out re-measurement"] == 0
    done = [t for t in streamed.study.trials if t.state.name == "COMPLETE"]
    assert done and all("held_out" in t.user_attrs for t in done)
    assert not any("held_out" in t.user_attrs for t in resident.study.trials)
    by_genome = {t.user_attrs["genome"]: resident.held_out[t.number]
                 for t in resident.study.trials if t.number in resident.held_out}
    same = [(t, by_genome[t.user_attrs["genome"]]) for t in done if t.user_attrs["genome"] in by_genome]
    assert len(same) >= 5  # the baselines at least
    for t, want in same:
        assert t.user_attrs["held_out"]["kl"] == pytest.approx(want["kl"], rel=1e-5), t.number
        assert streamed.held_out[t.number] == t.user_attrs["held_out"]
