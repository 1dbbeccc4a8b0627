import json
import subprocess
import sys

import pytest

from paretoq.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_table_on_the_demo(capsys):
    code, out, err = run(capsys, "info")
    assert code == 0
    assert "deepseek_v3: 5 layers, 4 MoE layers, 8 routed experts, top-2" in out
    for kind in ("attn", "dense", "shared", "expert"):
        assert f"\n{kind} " in out
    assert "routed experts hold" in out and "--budget 3:" in out


def test_info_json_follows_the_contract(capsys):
    code, out, _ = run(capsys, "info", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["model_type"] == "deepseek_v3"
    assert (info["num_layers"], info["num_experts"], info["top_k"]) == (5, 8, 2)
    assert set(info["params_by_kind"]) == {"attn", "dense", "shared", "expert"}
    by_kind = {}
    for c in info["components"]:
        assert set(c) >= {"key", "kind", "layer", "expert", "proj", "shape", "params"}
        assert c["params"] == c["shape"][0] * c["shape"][1]
        by_kind[c["kind"]] = by_kind.get(c["kind"], 0) + c["params"]
    assert by_kind == info["params_by_kind"]
    expert = next(c for c in info["components"] if c["kind"] == "expert")
    assert expert["key"] == "model.layers.1.mlp.experts.0.gate_proj" and expert["shape"] == [256, 256]
    assert next(c for c in info["components"] if c["kind"] == "attn")["expert"] is None


def test_budget_arithmetic(capsys):
    """What a budget leaves, checked by hand against params_by_kind."""
    _, out, _ = run(capsys, "info", "--json", "--budget", "2.5")
    info = json.loads(out)
    p, b = info["params_by_kind"], info["budget"]
    total, experts = sum(p.values()), p["expert"]
    assert b["searched_params"] == total
    assert b["rest_bits_if_experts_at_min"] == pytest.approx((2.5 * total - 2 * experts) / (total - experts))
    assert b["expert_bits_if_rest_at_max"] == pytest.approx((2.5 * total - 8 * (total - experts)) / experts)
    # the two extremes are consistent: the average over everything is the budget
    avg = (2 * experts + b["rest_bits_if_experts_at_min"] * (total - experts)) / total
    assert avg == pytest.approx(2.5)


def test_info_on_a_saved_tiny_model(capsys, tiny_model_dir):
    code, out, _ = run(capsys, "info", "--model", str(tiny_model_dir), "--components")
    assert code == 0
    assert "qwen2_moe: 2 layers, 2 MoE layers, 4 routed experts, top-2" in out
    assert "model.layers.1.mlp.shared_expert.down_proj" in out


def test_info_on_a_directory_that_is_not_a_model(capsys, tmp_path):
    code, out, err = run(capsys, "info", "--model", str(tmp_path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "no config.json" in err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    code, _, err = run(capsys, "info", "--model", str(tmp_path))
    assert code == 2 and err.count("\n") == 1
    assert "model_type 't5'" in err and "supported: deepseek_v3, gpt_oss, llama" in err


def test_console_script_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "paretoq.cli", "info"], capture_output=True, text=True)
    assert ok.returncode == 0 and "deepseek_v3" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "paretoq.cli", "info", "--model", str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("paretoq: error:")


@pytest.mark.parametrize("argv, phrases", [
    (["search", "--budget", "abc"], ["--budget", "'abc'", "between 2 and 8"]),
    (["info", "--budget", "nan"], ["--budget", "nan", "between 2 and 8"]),
    (["search", "--seed", "x"], ["--seed", "'x'", "integer"]),
    (["search", "--trials", "0"], ["--trials", "at least 1"]),
    (["search", "--bits", "2,7"], ["--bits", "'7'", "2,3,4,5,6,8"]),
    (["quantize", "--out", "q", "--uniform", "x"], ["--uniform", "2, 3, 4, 8"]),
    (["dashboard", "--port", "65536"], ["--port", "1 to 65535"]),
    (["export", "--plan", "p.json", "--format", "nosuch"], ["--format", "'nosuch'", "gptqmodel"]),
    (["quantize"], ["required", "--out"]),
])
def test_argument_errors_are_one_line_naming_option_value_and_accepted(capsys, argv, phrases):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("paretoq: error: argument") or "required" in err, err
    assert "usage:" not in err
    for phrase in phrases:
        assert phrase in err, err


def test_parsed_values_are_typed(capsys):
    from paretoq.cli import build_parser

    args = build_parser().parse_args(["search", "--bits", "4, 2,4", "--budget", "2.5", "--quiet"])
    assert args.bits == (2, 4) and args.budget == 2.5 and args.quiet


def test_long_work_shows_progress_on_stderr_unless_quiet(tiny_search_model_dir, tmp_path, capsys):
    argv = ["quantize", "--model", str(tiny_search_model_dir), "--uniform", "4", "--calib-tokens", "512",
            "--eval-tokens", "512", "--seq-len", "64"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert "100%|" in err and "layer" in err  # a bar per walk, counting layers
    assert main([*argv, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("wrote ")


def test_a_search_without_a_plan_within_the_budget_does_not_claim_one(monkeypatch, tmp_path, capsys):
    """No verified plan within the budget: no plan.json, and the closing lines do not name one."""
    import types

    import optuna

    import paretoq.search

    study = optuna.create_study(study_name="s", directions=["minimize", "minimize"])
    state = types.SimpleNamespace(study=study, plan=None, interrupted=False, out=tmp_path / "o")
    monkeypatch.setattr(paretoq.search, "run_search", lambda cfg: state)
    assert main(["search", "--budget", "2.5", "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "no verified plan within 2.5 bits yet, so no plan.json" in out
    assert "plan.json" not in out.split("\n", 1)[1] and "wrote" in out
