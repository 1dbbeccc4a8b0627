import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from paretoq.capture import Capture, cached_capture, capture
from paretoq.data import TokenSet
from paretoq.models import get_adapter, load_model


def _ids(n=3, seq=20, vocab=128, seed=0):
    return torch.randint(3, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _grab_inputs(module, store, key):
    return module.register_forward_hook(lambda m, args, out: store.setdefault(key, []).append(args[0].detach()))


@pytest.mark.parametrize("model_type", ["deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_expert_hessians_equal_XtX_of_the_routed_tokens(model_type):
    """H of a routed expert = X_e^T X_e over exactly the tokens its router sent it (float64, exact)."""
    model = tiny_model(model_type, dtype=torch.float64)
    adapter = get_adapter(model)
    ids = _ids(batch := 3)
    block = adapter.moe_blocks[-1]
    mlp = dict(model.named_modules())[block.path]
    seen = {}
    handle = _grab_inputs(mlp, seen, "x")
    cap = capture(adapter, TokenSet(ids, "test"), batch_size=2, progress=False)  # two batches
    handle.remove()
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen["x"]])
    _, _, chosen = block.router(x)  # the router's own choice, recomputed by the test
    for e in range(block.num_experts):
        X = x[(chosen == e).any(-1)]
        key = f"{block.experts_path}.{e}"
        Wg, Wu = adapter.weight(f"{key}.gate_proj"), adapter.weight(f"{key}.up_proj")
        bg, bu = adapter.bias(f"{key}.gate_proj"), adapter.bias(f"{key}.up_proj")
        g, u = F.linear(X, Wg, bg), F.linear(X, Wu, bu)
        if model_type == "gpt_oss":
            cfg = model.config
            g, u = g.clamp(max=cfg.swiglu_limit), u.clamp(-cfg.swiglu_limit, cfg.swiglu_limit)
            h = (u + 1) * g * torch.sigmoid(g * cfg.swiglu_alpha)
        else:
            h = F.silu(g) * u
        assert cap.tokens[f"{key}.gate_proj"] == X.shape[0] == cap.tokens[f"{key}.down_proj"]
        torch.testing.assert_close(cap.hessian(f"{key}.gate_proj"), X.T @ X, rtol=1e-12, atol=1e-12)
        assert cap.site[f"{key}.gate_proj"] == cap.site[f"{key}.up_proj"]
        torch.testing.assert_close(cap.hessian(f"{key}.down_proj"), h.T @ h, rtol=1e-10, atol=1e-10)
    assert batch * ids.shape[1] == cap.routing[block.layer].top_k_index.shape[0]
    torch.testing.assert_close(cap.routing[block.layer].top_k_index, chosen)


def test_linear_hessians_and_shared_sites():
    model = tiny_model("mixtral", dtype=torch.float64)
    adapter = get_adapter(model)
    modules = dict(model.named_modules())
    seen = {}
    handles = [_grab_inputs(modules[f"model.layers.1.self_attn.{p}"], seen, p) for p in ("q_proj", "o_proj")]
    ids = _ids()
    cap = capture(adapter, TokenSet(ids, "test"), batch_size=2, progress=False)
    for h in handles:
        h.remove()
    for proj in ("q_proj", "o_proj"):
        X = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[proj]])
        torch.testing.assert_close(cap.hessian(f"model.layers.1.self_attn.{proj}"), X.T @ X, rtol=1e-12, atol=1e-12)
        assert cap.tokens[f"model.layers.1.self_attn.{proj}"] == ids.numel()
    sites = {cap.site[f"model.layers.1.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj")}
    assert sites == {"model.layers.1.self_attn.q_proj"}  # q, k and v read one tensor: one Hessian
    assert cap.site["model.layers.1.self_attn.o_proj"] == "model.layers.1.self_attn.o_proj"
    assert set(cap.site) == {c.key for c in adapter.components}


def test_block_states_are_the_residual_stream_around_the_mlp():
    model = tiny_model("olmoe")
    adapter = get_adapter(model)
    ids = _ids(n=4, seq=16)
    cap = capture(adapter, TokenSet(ids, "test"), block_samples=40, progress=False)
    assert set(cap.blocks) == {0, 1}
    for layer, st in cap.blocks.items():
        assert st.inputs.shape == st.outputs.shape == (40, model.config.hidden_size)
        mlp = adapter.layers[layer].mlp
        norm = adapter.layers[layer].post_attention_layernorm
        with torch.no_grad():
            torch.testing.assert_close(st.outputs - st.inputs, mlp(norm(st.inputs)[None])[0], rtol=1e-4, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    adapter = get_adapter(tiny_model("deepseek_v3"))
    cap = capture(adapter, TokenSet(_ids(), "test"), progress=False)
    cap.save(tmp_path / "c.safetensors")
    back = Capture.load(tmp_path / "c.safetensors")
    assert back.site == cap.site and back.tokens == cap.tokens and back.meta == cap.meta
    assert all(torch.equal(back.hessians[k], v) for k, v in cap.hessians.items())
    assert torch.equal(back.routing[1].top_k_index, cap.routing[1].top_k_index)
    assert torch.equal(back.blocks[1].outputs, cap.blocks[1].outputs)


def test_cached_capture_hits_and_misses():
    loaded = load_model("demo")
    calib = TokenSet(_ids(2, 32, vocab=4096), "test")
    first, key, cached = cached_capture(loaded, calib, progress=False)
    again, key2, cached2 = cached_capture(loaded, calib, progress=False)
    assert (cached, cached2, key) == (False, True, key2)
    assert all(torch.equal(again.hessians[k], v) for k, v in first.hessians.items())
    _, key3, cached3 = cached_capture(loaded, TokenSet(_ids(2, 32, vocab=4096, seed=1), "test"), progress=False)
    assert not cached3 and key3 != key


def test_every_component_of_every_architecture_gets_a_hessian(model_type):
    adapter = get_adapter(tiny_model(model_type))
    ids = _ids(n=4, seq=32)
    cap = capture(adapter, TokenSet(ids, "test"), progress=False)
    assert set(cap.site) == {c.key for c in adapter.components}
    for c in adapter.components:
        H = cap.hessian(c.key)
        assert H.shape == (c.shape[1], c.shape[1])
        if c.kind != "expert":
            assert cap.tokens[c.key] == ids.numel() and H.diagonal().gt(0).all()
    assert set(cap.routing) == {b.layer for b in adapter.moe_blocks}
    for b in adapter.moe_blocks:  # every routed slot lands in exactly one expert's token count
        slots = sum(cap.tokens[f"{b.experts_path}.{e}.gate_proj"] for e in range(b.num_experts))
        assert slots == ids.numel() * b.top_k
