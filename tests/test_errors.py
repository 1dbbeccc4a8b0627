"""docs/errors.md, one test per row: exit 2, one line on stderr naming the problem and the fix, no
output file left behind (and the NaN row: the trial fails, the search goes on)."""

import dataclasses
import json
import math

import optuna
import pytest

from paretoq.cli import main

TINY = ["--calib-tokens", "512", "--eval-tokens", "512", "--seq-len", "64"]


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _refused(capsys, tmp_path, argv, *phrases, absent=()):
    before = _files(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paretoq: error: "), err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    for secret in absent:
        assert secret not in err
    assert _files(tmp_path) == before, "a partial output file was left behind"
    return lines[0]


def _search(tmp_path, *extra):
    return ["search", "--out", str(tmp_path / "out"), "--storage", f"sqlite:///{tmp_path}/s.db", *extra]


def test_budget_outside_the_bit_choices(capsys, tmp_path):
    _refused(capsys, tmp_path, _search(tmp_path, "--budget", "9"), "budget 9", "--budget")
    _refused(capsys, tmp_path, _search(tmp_path, "--budget", "3", "--bits", "4,8"), "budget")


def test_unknown_or_malformed_search_space(capsys, tmp_path):
    _refused(capsys, tmp_path, _search(tmp_path, "--space", "nope"), "unknown search space 'nope'")
    bad = tmp_path / "bad.yaml"
    bad.write_text("granularity: per-atom\nbits: {expert: [2, 4]}\n")
    _refused(capsys, tmp_path, _search(tmp_path, "--space", str(bad)), "granularity 'per-atom'")


@pytest.mark.parametrize("content, phrase", [
    ("{not json", "not JSON"),
    (json.dumps({"format": "paretoq.plan/9", "bits": {}}), "format"),
    (json.dumps({"format": "paretoq.plan/1", "bits": {"model.layers.99.mlp.down_proj": 4}}), "model.layers.99"),
    (json.dumps({"format": "paretoq.plan/1", "bits": {"model.layers.0.self_attn.o_proj": 5}}), "5"),
])
def test_bad_plan_files(capsys, tmp_path, content, phrase):
    plan = tmp_path / "plan.json"
    plan.write_text(content)
    _refused(capsys, tmp_path, ["quantize", "--plan", str(plan), "--out", str(tmp_path / "q")], phrase)


def test_a_directory_that_is_not_a_supported_model(capsys, tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    _refused(capsys, tmp_path, _search(tmp_path, "--model", str(model)), "bert")


def test_calibration_empty_or_too_short(capsys, tmp_path, tiny_search_model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    _refused(capsys, tmp_path, _search(tmp_path, "--calib", str(empty)), "holds no text")
    short = tmp_path / "short.txt"
    short.write_text("import os\n" * 40)
    _refused(capsys, tmp_path, _search(tmp_path, "--model", str(tiny_search_model_dir), "--calib", str(short)),
             "--calib-tokens")


def test_unreachable_storage_never_shows_the_password(capsys, tmp_path, tiny_search_model_dir):
    argv = ["search", "--model", str(tiny_search_model_dir), "--out", str(tmp_path / "out"), *TINY,
            "--storage", "postgresql+psycopg2://paretoq:s3cret-pw@127.0.0.1:1/studies"]
    line = _refused(capsys, tmp_path, argv, "cannot open storage", "***", absent=("s3cret-pw",))
    assert "postgresql+psycopg2://paretoq:***@127.0.0.1:1/studies" in line


def test_an_output_directory_that_cannot_be_written(capsys, tmp_path, tiny_search_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    argv = ["search", "--model", str(tiny_search_model_dir), "--out", str(blocker / "out"),
            "--storage", f"sqlite:///{tmp_path}/s.db", *TINY]
    _refused(capsys, tmp_path, argv, "cannot write outputs", "--out")


@pytest.mark.slow
def test_a_nan_candidate_fails_its_trial_and_the_search_goes_on(tiny_search_model_dir, tmp_path, monkeypatch):
    import paretoq.search as search
    from paretoq.evaluate import StreamedEvaluator

    real, calls = StreamedEvaluator.evaluate, {"n": 0}

    def sometimes_nan(self, bits, part):
        r = real(self, bits, part)
        if part != "select":  # sensitivities and held-out re-measurements
            return r
        calls["n"] += 1
        return dataclasses.replace(r, kl=math.nan) if calls["n"] == 3 else r  # the third trial

    monkeypatch.setattr(StreamedEvaluator, "evaluate", sometimes_nan)
    state = search.run_search(search.SearchConfig(
        budget=3.0, model=str(tiny_search_model_dir), trials=8, calib_tokens=512, eval_tokens=512, seq_len=64,
        sensitivity_tokens=128, storage=f"sqlite:///{tmp_path}/s.db", out=tmp_path / "out", progress=False))
    failed = [t for t in state.study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and "KL=nan" in failed[0].user_attrs["fail_reason"]
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in state.study.trials) == 8
    assert (tmp_path / "out" / "plan.json").is_file()
