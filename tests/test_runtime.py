"""The quantized runtime: every MoE architecture with packed modules swapped in gives the logits of
the model with the dequantized weights written back; checkpoints load packed; generate is greedy."""

import copy
import warnings

import pytest

import torch
from conftest import DEVICE, MOE_TYPES, tiny_model

import paretoq
from paretoq.cli import main
from paretoq.models import get_adapter, load_model
from paretoq.plan import Plan
from paretoq.quant.checkpoint import save_quantized
from paretoq.quant.quantizer import QuantSettings, rtn
from paretoq.runtime import QuantExperts, QuantLinear, load_runtime, pack_components, patch_model
from paretoq.runtime.generate import greedy


def mixed_rtn(adapter, group_size=32, every=1):
    """Each component at 2, 3, 4, 8 bits in turn (experts of one layer at different widths)."""
    out = {}
    for i, c in enumerate(adapter.components):
        if i % every == 0:
            gs = group_size if c.shape[1] % group_size == 0 else -1
            out[c.key] = rtn(adapter.weight(c).detach(), (2, 3, 4, 8)[i % 4], gs)
    return out


def dequantized_copy(model, tensors):
    ref = copy.deepcopy(model)
    adapter = get_adapter(ref)
    for k, q in tensors.items():  # the runtime stores fp16 scales and zeros, as checkpoints do
        adapter.set_weight(k, (q.codes.float() - q.zeros.half().float().repeat_interleave(q.group_size, -1))
                           * q.scales.half().float().repeat_interleave(q.group_size, -1))
    return ref


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_patched_model_matches_dequantized_weights(model_type, backend):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    tensors = mixed_rtn(adapter)
    ref = dequantized_copy(model, tensors)
    report = patch_model(adapter, pack_components(tensors), backend)
    assert report.expert_layers == len(adapter.moe_blocks) and not report.dequantized
    assert report.linears == sum(c.kind != "expert" for c in adapter.components)
    assert not any(isinstance(m, torch.nn.Linear) and not isinstance(m, QuantLinear)
                   for n, m in model.named_modules() if n.endswith(("q_proj", "o_proj", "down_proj")))
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = model.to(DEVICE)(ids.to(DEVICE)).logits.cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_partly_quantized_experts_fall_back_to_dequantized_weights():
    model = tiny_model("mixtral")
    adapter = get_adapter(model)
    tensors = mixed_rtn(adapter, every=3)
    ref = dequantized_copy(model, tensors)
    report = patch_model(adapter, pack_components(tensors), "torch")
    assert report.expert_layers == 0 and report.dequantized
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """The demo quantized at mixed widths (RTN: the runtime is under test, not GPTQ)."""
    loaded = load_model("demo")
    tensors = mixed_rtn(loaded.adapter, group_size=128)
    plan = Plan({k: q.bits for k, q in tensors.items()}, QuantSettings(group_size=128))
    return save_quantized(loaded, plan, tensors, tmp_path_factory.mktemp("ckpt") / "demo-mixed")


def test_checkpoint_runs_packed(demo_checkpoint):
    loaded, report = load_runtime(demo_checkpoint, torch.float32, "cpu", "torch")
    experts = [m for m in loaded.model.modules() if isinstance(m, QuantExperts)]
    assert experts and report.linears > 0
    assert {2, 3, 4, 8} <= set(experts[0].up_bits) | set(experts[0].down_bits)
    back = paretoq.load_quantized(demo_checkpoint)
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, back.model(ids).logits, rtol=1e-4, atol=1e-4)


def test_generate_is_greedy_on_the_dequantized_model(demo_checkpoint, capsys):
    prompt = "Once upon a time"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning (or any) from transformers would fail the command
        assert main(["generate", "--checkpoint", str(demo_checkpoint), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert "Warning" not in err
    assert out.startswith(prompt) and "tokens/s" in err
    back = paretoq.load_quantized(demo_checkpoint)
    ids = back.tokenizer(prompt, return_tensors="pt").input_ids
    want, _ = greedy(back.model, ids, 8, back.tokenizer.eos_token_id)
    assert out == prompt + back.tokenizer.decode(want) + "\n"


@pytest.mark.skipif(DEVICE != "cuda", reason="the interpreter takes minutes for the demo; the tiny models above "
                    "check the Triton path on CPU")
def test_triton_generates_the_torch_tokens(demo_checkpoint):
    """The GPU acceptance check: the Triton kernels and the torch path generate the same greedy tokens."""
    runs = {}
    for backend in ("torch", "triton"):
        loaded, _ = load_runtime(demo_checkpoint, torch.float16 if DEVICE == "cuda" else torch.float32, DEVICE,
                                 backend)
        ids = loaded.tokenizer("The cat", return_tensors="pt").input_ids.to(DEVICE)
        runs[backend], _ = greedy(loaded.model, ids, 4)
    assert runs["triton"] == runs["torch"]


def test_generate_rejects_bad_input(demo_checkpoint, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a paretoq checkpoint" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(demo_checkpoint), "--prompt", "x", "--max-new-tokens", "0"]) == 2


def test_from_plan_takes_components_from_the_quant_cache():
    """A plan plus the quant cache (anything with `get(key, bits)`) patches without quantizing again."""
    from paretoq.runtime import from_plan

    model = tiny_model("qwen3_moe")
    adapter = get_adapter(model)
    tensors = mixed_rtn(adapter)
    ref = dequantized_copy(model, tensors)

    class Cache:
        def get(self, key, bits):
            assert tensors[key].bits == bits
            return tensors[key]

    plan = Plan({k: q.bits for k, q in tensors.items()}, QuantSettings(group_size=32))
    report = from_plan(adapter, plan, Cache(), "torch")
    assert report.expert_layers == 1
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)
