"""`paretoq eval --gguf`: a GGUF written the way llama.cpp's converter lays tensors out reads back
into the model exactly (f32: KL 0 against the model it came from), and quantized tensors read back
as `gguf`'s own dequantization of them (the KL of those weights put in by hand)."""

import numpy as np
import pytest
import torch

from conftest import save_tiny_with_demo_tokenizer
from paretoq.errors import ParetoqError
from paretoq.eval_plans import eval_plans
from paretoq.evaluate import StreamedEvaluator
from paretoq.export.ggml_activations import Q8_0, rounded_linear_inputs
from paretoq.export.llamacpp import GGUF_ARCH, gguf_names
from paretoq.walk import open_model

DATA = dict(calib_tokens=256, eval_tokens=256, seq_len=64, progress=False)


def _model_dir(tmp_path, model_type: str):
    return save_tiny_with_demo_tokenizer(tmp_path / model_type, model_type, tie_word_embeddings=False)


def _converter_layout(adapter, config, arch: str) -> dict[str, np.ndarray]:
    """GGUF tensor name -> array, laid out as llama.cpp's convert_hf_to_gguf.py writes them."""
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for c in adapter.components:
        W = adapter.weight(c.key).detach().float().numpy()
        names = gguf_names(c)
        if c.kind == "expert":
            experts.setdefault(names[0], {})[c.expert] = W
        elif c.proj == "kv_b_proj":  # DeepseekV2Model.modify_tensors
            heads, nope, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
            kv_b = W.reshape(heads, nope + v, W.shape[-1])
            out[names[1]] = np.ascontiguousarray(kv_b[:, :nope].swapaxes(1, 2))
            out[names[2]] = np.ascontiguousarray(kv_b[:, nope:])
        elif arch == "llama" and c.proj in ("q_proj", "k_proj"):  # LlamaModel.permute
            heads = config.num_attention_heads if c.proj == "q_proj" else config.num_key_value_heads
            out[names[0]] = W.reshape(heads, 2, W.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(W.shape)
        else:
            out[names[0]] = W
    for name, by_expert in experts.items():
        out[name] = np.stack([by_expert[e] for e in sorted(by_expert)])
    model = adapter.model
    out["token_embd"] = model.get_input_embeddings().weight.detach().float().numpy()
    out["output"] = model.get_output_embeddings().weight.detach().float().numpy()
    return out


def _write(path, arch: str, tensors: dict[str, np.ndarray], qtype: str) -> dict[str, np.ndarray]:
    """Write ``tensors`` (Q8_0 where the rows allow it, else F32, as llama.cpp falls back); return
    what gguf's own dequantization gives back for each."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import dequantize, quantize

    w = GGUFWriter(str(path), arch)
    back = {}
    for name, a in tensors.items():
        a = np.ascontiguousarray(a, dtype=np.float32)
        t = GGMLQuantizationType[qtype] if qtype != "F32" and a.shape[-1] % 32 == 0 else GGMLQuantizationType.F32
        data = quantize(a, t) if t != GGMLQuantizationType.F32 else a
        w.add_tensor(f"{name}.weight", data, raw_dtype=t)
        back[name] = dequantize(data, t) if t != GGMLQuantizationType.F32 else a
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return back


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_a_gguf_reads_back_into_the_model_it_came_from(tmp_path, monkeypatch, model_type):
    monkeypatch.setenv("PARETOQ_CACHE", str(tmp_path / "cache"))
    path = _model_dir(tmp_path, model_type)
    sm = open_model(path, max_memory=0)
    sm.materialize_all()
    arch = GGUF_ARCH[model_type]
    layout = _converter_layout(sm.adapter, sm.model.config, arch)

    _write(tmp_path / "f32.gguf", arch, layout, "F32")
    exact = eval_plans(gguf=[tmp_path / "f32.gguf"], model=str(path), **DATA).plans[0]
    assert exact.result.kl < 1e-9 and exact.result.agreement == 1.0  # every tensor in its place
    assert exact.avg_bits == 32.0

    back = _write(tmp_path / "q8.gguf", arch, layout, "Q8_0")
    got = eval_plans(gguf=[tmp_path / "q8.gguf"], model=str(path), gguf_activations="exact", **DATA)
    q8 = got.plans[0]
    # The same weights put in by hand, from the converter-side arrays (no GGUF reading involved).
    by_key = {}
    for c in sm.adapter.components:
        names = gguf_names(c)
        if c.kind == "expert":
            by_key[c.key] = back[names[0]][c.expert]
        elif c.proj == "kv_b_proj":
            kv = np.concatenate([back[names[1]].swapaxes(1, 2), back[names[2]]], axis=1)
            by_key[c.key] = kv.reshape(-1, kv.shape[-1])
        elif arch == "llama" and c.proj in ("q_proj", "k_proj"):
            heads = sm.model.config.num_attention_heads if c.proj == "q_proj" else sm.model.config.num_key_value_heads
            W = back[names[0]]
            by_key[c.key] = W.reshape(heads, W.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(W.shape)
        else:
            by_key[c.key] = back[names[0]]
    from paretoq.calibrate import prepare
    from paretoq.data import load_token_sets

    sets = load_token_sets(sm.loaded.tokenizer, "demo", 256, 256, 64, 0)
    refs = prepare(sm, sets.calib, {"eval": sets.eval}, features=False, progress=False).references
    by_key.update({"model.embed_tokens": back["token_embd"], "lm_head": back["output"]})
    want = StreamedEvaluator(sm, lambda k, b: torch.from_numpy(np.ascontiguousarray(by_key[k])), {"eval": sets.eval},
                             refs).evaluate(dict.fromkeys(by_key, 0), "eval")
    assert want.kl > 0 and q8.result.kl == pytest.approx(want.kl, rel=1e-6)
    assert q8.result.ppl == pytest.approx(want.ppl, rel=1e-6)
    assert 8.0 < q8.avg_bits < 32.0  # Q8_0 is 8.5 bits a weight; the narrow tensors stayed f32

    # By default the file is scored as llama.cpp computes it: every product with a Q8_0 weight takes
    # its input rounded to q8_0 blocks; f32 tensors and the split kv_b (attn_k_b/v_b) are left alone.
    as_llama = eval_plans(gguf=[tmp_path / "q8.gguf"], model=str(path), **DATA).plans[0]
    split = {c.key for c in sm.adapter.components if c.proj == "kv_b_proj" and gguf_names(c)[0] not in back}
    rounding = {k: Q8_0 for k in by_key if k not in split and by_key[k].shape[-1] % 32 == 0}
    rounding["lm_head"] = Q8_0
    want = StreamedEvaluator(sm, lambda k, b: torch.from_numpy(np.ascontiguousarray(by_key[k])), {"eval": sets.eval},
                             refs, input_rounding=rounding).evaluate(dict.fromkeys(by_key, 0), "eval")
    assert as_llama.result.kl == pytest.approx(want.kl, rel=1e-6)
    assert as_llama.result.kl != pytest.approx(q8.result.kl, rel=1e-3)  # the rounding is there


def test_rounded_inputs_in_the_streamed_walk_equal_a_whole_model_forward(tmp_path, monkeypatch):
    """The evaluator installs each layer's rounding as it walks (streamed: the weights are read
    layer by layer); the same rounding on the whole resident model gives the same KL."""
    monkeypatch.setenv("PARETOQ_CACHE", str(tmp_path / "cache"))
    from paretoq.calibrate import prepare
    from paretoq.data import load_token_sets

    path = _model_dir(tmp_path, "qwen3_moe")
    sm = open_model(path, max_memory=0)
    sets = load_token_sets(sm.loaded.tokenizer, "demo", 256, 256, 64, 0)
    refs = prepare(sm, sets.calib, {"eval": sets.eval}, features=False, progress=False).references
    keys = [c.key for c in sm.adapter.components]
    rounding = {**dict.fromkeys(keys, Q8_0), "lm_head": Q8_0}
    got = StreamedEvaluator(sm, lambda k, b: sm.adapter.weight(k).detach().clone(), {"eval": sets.eval}, refs,
                            input_rounding=rounding).evaluate(dict.fromkeys(keys, 0), "eval").kl

    whole = open_model(path)
    whole.materialize_all()
    model, ids = whole.model, sets.eval.input_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
        weights = [(whole.adapter.weight(k), Q8_0) for k in keys] + [(model.lm_head.weight, Q8_0)]
        with rounded_linear_inputs(weights):
            lq = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
    want = (ref.exp() * (ref - lq)).sum(-1).mean().item()
    assert want > 0 and got == pytest.approx(want, rel=1e-4)


def test_bad_ggufs_are_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("PARETOQ_CACHE", str(tmp_path / "cache"))
    path = _model_dir(tmp_path, "qwen3_moe")
    sm = open_model(path, max_memory=0)
    sm.materialize_all()
    layout = _converter_layout(sm.adapter, sm.model.config, "qwen3moe")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all")
    cases = {"junk.gguf": "is not a readable GGUF file", "missing.gguf": "does not exist"}
    _write(tmp_path / "arch.gguf", "llama", layout, "F32")
    cases["arch.gguf"] = "architecture 'llama'"
    _write(tmp_path / "short.gguf", "qwen3moe", {k: v for k, v in layout.items() if "ffn_down_exps" not in k}, "F32")
    cases["short.gguf"] = "has no tensor blk.1.ffn_down_exps.weight"
    bad = dict(layout)
    bad["blk.0.attn_q"] = bad["blk.0.attn_q"][:, :32]
    _write(tmp_path / "shape.gguf", "qwen3moe", bad, "F32")
    cases["shape.gguf"] = "blk.0.attn_q.weight has shape [64, 32] where model.layers.0.self_attn.q_proj needs [64, 64]"
    for name, message in cases.items():
        with pytest.raises(ParetoqError, match=message.replace("[", r"\[").replace("]", r"\]")):
            eval_plans(gguf=[tmp_path / name], model=str(path), **DATA)
