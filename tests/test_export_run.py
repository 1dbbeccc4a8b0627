import json

import optuna
import pytest

from paretoq.cli import main
from paretoq.export import export
from paretoq.export.targets import TARGETS, problems
from paretoq.models import load_model
from paretoq.plan import Plan
from paretoq.search import SearchConfig, run_search
from paretoq.space import component_bits, decode_genome


@pytest.fixture
def plans(tiny_model_dir, tmp_path):
    """A per-expert plan and a uniform one for the saved tiny qwen2_moe."""
    adapter = load_model(str(tiny_model_dir), weights=False).adapter
    model = {"name_or_path": str(tiny_model_dir), "model_type": "qwen2_moe"}
    per_expert = Plan({c.key: (2 if c.expert % 2 else 3) if c.kind == "expert" else 4 for c in adapter.components},
                      model=model)
    per_expert.save(tmp_path / "per_expert.json")
    Plan({c.key: 4 for c in adapter.components}, model=model).save(tmp_path / "uniform.json")
    return tmp_path, adapter


@pytest.mark.parametrize("fmt, files", [
    ("gptqmodel", ["quantize_config.json", "quantize_gptqmodel.py"]),
    ("vllm", ["quantize_config.json", "quantize_gptqmodel.py"]),
    ("llmcompressor", ["recipe.yaml", "quantize_llmcompressor.py"]),
    ("llamacpp", ["tensor-types.txt"]),
    ("exl3", ["recompile.yaml"]),
    ("json", ["bits.json"]),
])
def test_export_writes_the_files_and_the_next_command(plans, capsys, fmt, files):
    tmp, _ = plans
    assert main(["export", "--plan", str(tmp / "uniform.json"), "--format", fmt]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp / f"export-{fmt}").iterdir()) == sorted(files)
    assert "next:\n  " in out and "{out}" not in out
    for name in files:
        if name.endswith(".py"):
            compile((tmp / f"export-{fmt}" / name).read_text(), name, "exec")


def test_a_per_expert_plan_needs_collapse_for_llamacpp(plans, capsys):
    tmp, adapter = plans
    argv = ["export", "--plan", str(tmp / "per_expert.json"), "--format", "llamacpp", "--out", str(tmp / "gguf")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "llama.cpp gives model.layers.0.mlp.experts.*.gate_proj one width" in err
    assert "pass --collapse max or --collapse weighted" in err and not (tmp / "gguf").exists()
    assert main(argv + ["--collapse", "weighted"]) == 0
    out = capsys.readouterr().out
    assert "collapsed 12 components: average bits" in out
    collapsed = Plan.load(tmp / "gguf" / "plan.collapsed.json")
    assert not problems(collapsed, adapter, TARGETS["llamacpp"])
    # the per-expert plan goes to GPTQModel as it is
    assert main(["export", "--plan", str(tmp / "per_expert.json"), "--format", "gptqmodel"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--plan", "nope.json", "--format", "json"], "plan file 'nope.json' does not exist"),
    (["--plan", "{plain}", "--format", "json"], "the plan names no model"),
    (["--plan", "{uniform}", "--format", "llamacpp", "--ggml-types", "2=q9_k"], "--ggml-types entry '2=q9_k'"),
    (["--plan", "{uniform}", "--format", "vllm", "--model", "{missing}"], "does not exist"),
])
def test_bad_input_exits_2(plans, capsys, argv, message):
    tmp, _ = plans
    (tmp / "plain.json").write_text(json.dumps({"format": "paretoq.plan/1", "bits": {}}))
    argv = [a.format(plain=tmp / "plain.json", uniform=tmp / "uniform.json", missing=tmp / "missing") for a in argv]
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_export_is_callable_from_python(plans):
    tmp, _ = plans
    r = export(tmp / "uniform.json", "vllm", out=tmp / "v")
    cfg = json.loads((tmp / "v" / "quantize_config.json").read_text())
    assert cfg["bits"] == 4 and cfg["sym"] is True and r.collapsed is None and r.notes  # sym differs from the plan's


@pytest.mark.slow
def test_a_search_for_vllm_exports_without_collapsing(tiny_search_model_dir, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path}/s.db"
    state = run_search(SearchConfig(
        budget=5.0, model=str(tiny_search_model_dir), trials=6, round_size=3, calib_tokens=256, eval_tokens=256,
        seq_len=64, sensitivity_tokens=64, study="vllm", storage=storage, out=tmp_path / "out", progress=False,
        target="vllm"))
    study = optuna.load_study(study_name="vllm", storage=storage)
    assert study.user_attrs["target"] == "vllm"
    adapter = load_model(str(tiny_search_model_dir), weights=False).adapter
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 6
    for t in done:  # every proposal, baselines included, is a plan vLLM loads
        genome = decode_genome(t.user_attrs["genome"])
        bits = component_bits(state.groups, {g.name: g.choices[i] for g, i in zip(state.groups, genome)})
        assert not problems(Plan(bits), adapter, TARGETS["vllm"])
    plan = tmp_path / "out" / "plan.json"
    quant = json.loads(plan.read_text())["quant"]  # measured with the quantizer vLLM serves
    assert (quant["sym"], quant["act_order"]) == (True, False)
    assert study.user_attrs["quant"] == quant
    for fmt in ("gptqmodel", "vllm"):
        assert main(["export", "--plan", str(plan), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        out = capsys.readouterr().out
        assert "collapsed" not in out and "will differ" not in out
        assert json.loads((tmp_path / fmt / "quantize_config.json").read_text())["sym"] is True


def test_search_for_a_target_refuses_a_budget_it_cannot_reach(tmp_path, capsys):
    argv = ["search", "--budget", "3", "--target", "vllm", "--out", str(tmp_path / "o"),
            "--storage", f"sqlite:///{tmp_path}/s.db"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "budget 3 is below the 4 bits that --target vllm needs at least; pass --budget 4 or more" in err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()
