import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import paretoq
from conftest import tiny_model
from paretoq.capture import capture
from paretoq.cli import main
from paretoq.data import TokenSet, load_token_sets
from paretoq.models import get_adapter, load_model
from paretoq.plan import Plan
from paretoq.quant.pack import unpack
from paretoq.quant.quantizer import QuantSettings
from paretoq.quant.sequential import sequential_gptq


def _ppl(model, ids):
    with torch.no_grad():
        lp = F.log_softmax(model(ids).logits[:, :-1].float(), dim=-1)
    return math.exp(-lp.gather(-1, ids[:, 1:, None]).mean().item())


@pytest.mark.slow
def test_uniform_4_bit_demo_checkpoint(tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", "--uniform", "4", "--out", str(out)]) == 0
    assert "136 components at 4.000 average bits" in capsys.readouterr().out
    fp = load_model("demo")
    q = paretoq.load_quantized(out)
    ids = load_token_sets(fp.tokenizer, "demo").eval.input_ids
    ppl_fp, ppl_q = _ppl(fp.model, ids), _ppl(q.model, ids)
    assert abs(ppl_q / ppl_fp - 1) < 0.03, (ppl_fp, ppl_q)
    # the bytes on disk for the components are exactly the plan's arithmetic
    plan = Plan.load(out / "plan.json")
    from paretoq.quant.checkpoint import read_quantized

    _, state = read_quantized(out)  # quantize writes one shard per layer
    stored = sum(t.numel() * t.element_size() for k, t in state.items() if k.endswith((".qweight", ".scales", ".zeros")))
    assert stored == plan.size_bytes(fp.adapter)
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in state)  # fused tensors not stored


@pytest.mark.parametrize("model_type", ["qwen2_moe", "gpt_oss", "llama"])
def test_checkpoint_reloads_what_was_quantized(tmp_path, model_type):
    """A mixed plan (some components left in fp) saved and reloaded gives the quantized model's outputs."""
    from paretoq.models.loading import LoadedModel
    from paretoq.quant.checkpoint import save_quantized

    model = tiny_model(model_type)
    model.config.save_pretrained(tmp_path / "fp")
    adapter = get_adapter(model)
    comps = adapter.components
    plan = Plan({c.key: (2, 3, 4, 8)[i % 4] for i, c in enumerate(comps) if i % 5}, QuantSettings(group_size=32))
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    q = sequential_gptq(adapter, plan, TokenSet(ids, "t"), progress=False)
    loaded = LoadedModel(model, None, adapter, "tiny", tmp_path / "fp")
    save_quantized(loaded, plan, q.tensors, tmp_path / "ckpt", dtype=torch.float32)
    back = paretoq.load_quantized(tmp_path / "ckpt")
    state = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    for key, t in q.tensors.items():
        assert torch.equal(unpack(state[f"{key}.qweight"], t.bits, t.codes.shape[1]), t.codes)
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids).logits, model(ids).logits, rtol=2e-2, atol=2e-2)
    untouched = next(c for i, c in enumerate(comps) if not i % 5)
    assert torch.equal(back.adapter.weight(untouched), adapter.weight(untouched))


def test_each_layer_sees_the_quantized_layers_before_it():
    """Layer 1's Hessians in sequential GPTQ come from the model with layer 0 already quantized."""
    model = tiny_model("mixtral")
    adapter = get_adapter(model)
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    fp_H = capture(adapter, TokenSet(ids, "t"), progress=False).hessian("model.layers.1.self_attn.q_proj").clone()
    plan = Plan.uniform(adapter, 2, quant=QuantSettings(group_size=32))
    seen = []
    import paretoq.quant.sequential as seq

    real = seq.quantize_components
    def spy(adapter_, cap, bits, settings):
        if "model.layers.1.self_attn.q_proj" in bits:
            seen.append(cap.hessian("model.layers.1.self_attn.q_proj").clone())
            layer0 = adapter_.weight("model.layers.0.self_attn.q_proj")
            assert len(torch.unique(layer0[0, :32])) <= 4  # layer 0 already holds 2-bit weights
        return real(adapter_, cap, bits, settings)
    seq.quantize_components = spy
    try:
        sequential_gptq(adapter, plan, TokenSet(ids, "t"), progress=False)
    finally:
        seq.quantize_components = real
    assert seen and not torch.allclose(seen[0], fp_H)


def test_bad_plans_fail_before_any_work(tmp_path, capsys):
    (tmp_path / "p.json").write_text('{"format": "paretoq.plan/1", "bits": {"model.layers.0.nope": 4}}')
    assert main(["quantize", "--plan", str(tmp_path / "p.json"), "--out", str(tmp_path / "o")]) == 2
    assert "does not have" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["quantize", "--uniform", "5", "--out", str(tmp_path / "o")]) == 2
    assert main(["quantize", "--out", str(tmp_path / "o")]) == 2
    assert "either --plan" in capsys.readouterr().err
