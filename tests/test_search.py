import json

import optuna
import pytest

from paretoq.cli import main
from paretoq.search import SearchConfig, run_search


def _config(model_dir, tmp_path, **kw):
    base = dict(budget=3.0, model=str(model_dir), trials=30, round_size=10, calib_tokens=512, eval_tokens=512,
                seq_len=64, sensitivity_tokens=128, study="tiny", storage=f"sqlite:///{tmp_path}/s.db",
                out=tmp_path / "out", progress=False)
    base.update(kw)
    return SearchConfig(**base)


@pytest.mark.slow
def test_search_writes_the_outputs_and_resumes(tiny_search_model_dir, tmp_path):
    state = run_search(_config(tiny_search_model_dir, tmp_path))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["artifacts", "front.json", "front.png", "plan.json", "report.md"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["format"] == "paretoq.plan/1" and plan["avg_bits"] <= 3.0 and plan["budget"] == 3.0
    assert set(plan["metrics"]) >= {"kl", "ppl", "ppl_fp", "agreement"}
    front = json.loads((out / "front.json").read_text())
    assert all(set(p) >= {"avg_bits", "kl", "source", "trial"} for p in front["front"])
    names = {b["name"] for b in front["baselines"]}
    assert {"uniform-2", "uniform-3", "knapsack", "MoQa", "+Attn"} <= names
    # each uniform point is dominated or matched by a front point
    for b in front["baselines"]:
        if b["name"].startswith("uniform"):
            assert any(p["kl"] <= b["kl"] + 1e-12 and p["avg_bits"] <= b["avg_bits"] + 1e-9 for p in front["front"])
    # the best plan is no worse than any feasible baseline
    assert all(plan["metrics"]["kl"] <= b["kl"] + 1e-12 for b in front["baselines"] if b["feasible"])
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/s.db")
    assert study.metric_names == ["KL", "avg_bits"]
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 30
    for t in done:
        assert set(t.user_attrs) >= {"source", "avg_bits", "effective_bits", "size_bytes", "kl", "ppl", "agreement",
                                     "predicted_kl", "feasible"}
        assert t.user_attrs["feasible"] == (t.values[1] <= 3.0 + 1e-9)
    sources = [t.user_attrs["source"] for t in done]
    assert "surrogate" in sources and "nsga2" in sources
    assert len([s for s in sources if s == "baseline:knapsack"]) == 1
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


@pytest.mark.parametrize("argv, message", [
    (["--budget", "1.5"], "budget 1.5 is outside the bit choices; pass --budget between 2 and 8"),
    (["--budget", "9"], "pass --budget between 2 and 8"),
    (["--space", "nope"], "unknown search space 'nope'"),
    (["--bits", "3", "--space", "default", "--budget", "2.5"], "budget 2.5 is below the smallest plan"),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, message):
    assert main(["search", "--out", str(tmp_path / "o"), "--storage", f"sqlite:///{tmp_path}/s.db", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
