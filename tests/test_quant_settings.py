"""The quantizer's settings are the user's (and the target engine's): flags, precedence, and that
they reach GPTQ, the plan and the search."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from paretoq.cli import build_parser, main, quant_flags
from paretoq.errors import ParetoqError
from paretoq.export.targets import TARGETS
from paretoq.quant.settings import QuantSettings, flag_args, settings_for

TINY = ["--calib-tokens", "512", "--eval-tokens", "512", "--seq-len", "64"]


def test_flags_over_the_target_over_the_plan_over_the_defaults():
    assert settings_for({}) == QuantSettings()
    plan = QuantSettings(group_size=64, damp=0.05)
    assert settings_for({}, base=plan) == plan
    assert settings_for({"group_size": 32}, base=plan) == QuantSettings(group_size=32, damp=0.05)
    vllm = settings_for({}, TARGETS["vllm"])
    assert (vllm.sym, vllm.act_order, vllm.group_size) == (True, False, 128)
    assert settings_for({"sym": True, "damp": 0.1}, TARGETS["vllm"]).damp == 0.1
    with pytest.raises(ParetoqError, match="--asym: vLLM runs sym=True, not False"):
        settings_for({"sym": False}, TARGETS["vllm"])
    with pytest.raises(ParetoqError, match="--act-order: vLLM runs act_order=False"):
        settings_for({"act_order": True}, TARGETS["vllm"])
    assert settings_for({"act_order": True}, TARGETS["gptqmodel"]).act_order  # an engine that runs either
    with pytest.raises(ParetoqError, match="damp 5"):
        settings_for({"damp": 5})


@pytest.mark.parametrize("flags", [{}, {"sym": True}, {"sym": False, "act_order": True},
                                   {"group_size": -1, "act_order": False, "damp": 0.1, "grid": "minmax"}])
def test_worker_flags_give_the_same_settings_back(flags):
    """``search --jobs`` hands its settings to its workers as flags."""
    for command in ("search", "quantize", "eval"):
        extra = ["--out", "x"] if command == "quantize" else []
        args = build_parser().parse_args([command, *extra, *flag_args(flags)])
        assert quant_flags(args) == flags


def test_quantize_flags_reach_gptq_and_the_checkpoint(tiny_search_model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_search_model_dir), "--uniform", "2", "--sym", "--group-size", "32",
                 "--grid", "minmax", "--out", str(out), "-q", *TINY]) == 0
    capsys.readouterr()
    recorded = json.loads((out / "plan.json").read_text())["quant"]
    assert (recorded["sym"], recorded["group_size"], recorded["grid"]) == (True, 32, "minmax")
    index = json.loads((out / "quantization.json").read_text())
    seen = 0
    for path in out.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                if name.endswith(".zeros"):  # symmetric at 2 bits: every zero point is 2^(2-1)
                    zeros, scales = f.get_tensor(name), f.get_tensor(name.replace(".zeros", ".scales"))
                    assert torch.equal(zeros, torch.full_like(zeros, 2))
                    in_features = index["components"][name[:-len(".zeros")]]["shape"][1]
                    assert scales.shape[-1] == max(1, in_features // 32)
                    seen += 1
    assert seen > 10


def test_eval_flags_change_what_is_measured(tiny_search_model_dir, capsys):
    model = ["--model", str(tiny_search_model_dir), *TINY]
    kl = {}
    for name, flags in {"asym": [], "sym": ["--sym"], "sym-again": ["--sym"]}.items():
        assert main(["eval", "--uniform", "2", "--json", *flags, *model]) == 0
        kl[name] = json.loads(capsys.readouterr().out)["kl"]
    assert kl["sym"] == kl["sym-again"] and kl["sym"] != kl["asym"]


def gpt_oss_dir(tmp_path):
    """A one-layer GPT-OSS at the real hidden size, 2880 = 64 x 45: group 128 cannot tile it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from paretoq.models import load_tokenizer
    from paretoq.models.loading import demo_dir

    tok = load_tokenizer(demo_dir())
    cfg = AutoConfig.for_model("gpt_oss", vocab_size=len(tok), hidden_size=2880, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=32, intermediate_size=64,
                               num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                               layer_types=["full_attention"], bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, experts_implementation="eager")
    model.save_pretrained(tmp_path / "gpt_oss")
    tok.save_pretrained(tmp_path / "gpt_oss")
    return tmp_path / "gpt_oss"


def test_gpt_oss_search_refuses_group_128_before_the_capture_and_runs_with_64(tmp_path, capsys):
    model = gpt_oss_dir(tmp_path)
    capsys.readouterr()  # transformers' progress bar while saving
    argv = ["search", "--model", str(model), "--budget", "3", "--storage", f"sqlite:///{tmp_path}/s.db",
            "--out", str(tmp_path / "out"), "-q", *TINY]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "group size 128 does not divide the input width 2880" in err and "--group-size 64 or 32" in err
    assert not (tmp_path / "out").exists()
    # min-max grid and two widths: the capture and GPTQ at 2880 wide are what is tested, cheaply
    assert main([*argv, "--group-size", "64", "--grid", "minmax", "--bits", "2,4", "--trials", "3"]) == 0
    capsys.readouterr()
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert (plan["quant"]["group_size"], plan["quant"]["grid"]) == (64, "minmax")
    assert plan["model"]["model_type"] == "gpt_oss" and set(plan["bits"].values()) <= {2, 4}
    # resuming the study with another quantizer is refused before the capture
    assert main([*argv, "--group-size", "32", "--grid", "minmax", "--bits", "2,4", "--trials", "4"]) == 2
    err = capsys.readouterr().err
    assert "study 'gpt_oss-3bit' was measured with group_size 64; pass the same quantizer settings" in err
