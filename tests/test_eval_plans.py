import json

import pytest

from paretoq.cli import main
from paretoq.evaluate import run_lm_eval
from paretoq.models import load_model
from paretoq.zoo.tasks import demo_tasks


def test_kl_orders_uniform_widths(tiny_search_model_dir, capsys):
    """Fewer bits, more KL, end to end through `paretoq eval`. On the tiny model: GPTQ at four
    widths of the whole demo took 100 s of CI's 20 minutes (the demo's figures: docs/benchmarks.md)."""
    assert main(["eval", "--model", str(tiny_search_model_dir), "--uniform", "8", "4", "3", "2", "--json",
                 "--calib-tokens", "1024", "--eval-tokens", "1024", "--seq-len", "64"]) == 0
    rows = {r["plan"]: r for r in json.loads(capsys.readouterr().out)}
    kl = [rows[f"uniform-{b}"]["kl"] for b in (8, 4, 3, 2)]
    assert 0 < kl[0] < kl[1] < kl[2] < kl[3]
    for r in rows.values():
        assert set(r) >= {"avg_bits", "kl", "ppl", "ppl_fp", "agreement"}


def test_minimal_plan_file_and_the_table(tiny_search_model_dir, tmp_path, capsys):
    expert = next(c.key for c in load_model(str(tiny_search_model_dir), weights=False).adapter.components
                  if c.kind == "expert" and c.layer == 2)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"format": "paretoq.plan/1", "bits": {expert: 2}}))
    tiny = ["--model", str(tiny_search_model_dir), "--calib-tokens", "1024", "--eval-tokens", "1024", "--seq-len", "64"]
    assert main(["eval", "--plan", str(plan), "--json", *tiny]) == 0
    r = json.loads(capsys.readouterr().out)
    # avg_bits is over the whole model: the other components stay in full precision
    assert 16 < r["avg_bits"] < 32 and r["kl"] > 0 and r["ppl_fp"] > 0 and 0.9 < r["agreement"] < 1
    assert main(["eval", "--plan", str(plan), *tiny]) == 0
    out = capsys.readouterr().out
    assert "full precision" in out and "plan.json" in out


def test_bad_input_exits_2_before_work(tmp_path, capsys):
    assert main(["eval"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    (tmp_path / "p.json").write_text(json.dumps({"format": "paretoq.plan/1", "bits": {"nope": 4}}))
    assert main(["eval", "--plan", str(tmp_path / "p.json")]) == 2
    assert "does not have" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_lm_eval_tasks_run_offline_and_the_fp_model_beats_chance():
    demo = load_model("demo")
    scores = run_lm_eval(demo.model, demo.tokenizer, demo_tasks())
    assert scores["paretoq_demo_mc"]["sample_len"] == 300
    assert scores["paretoq_demo_mc"]["acc_norm,none"] > 0.33  # chance is 0.25; 0.33 is over 3 sigma at n=300
    assert 1.5 < scores["paretoq_demo_ppl"]["byte_perplexity,none"] < 8
