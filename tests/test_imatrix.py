"""paretoq's llama.cpp importance matrix: the sums a direct computation gives, in llama-imatrix's GGUF layout."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import save_tiny_with_demo_tokenizer
from paretoq.data import load_token_sets
from paretoq.errors import ParetoqError
from paretoq.export.imatrix import check, imatrix, read
from paretoq.models import get_adapter, load_model

TOKENS = dict(calib_tokens=256, eval_tokens=256, seq_len=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_with_demo_tokenizer(tmp_path_factory.mktemp("im_qwen2_moe"), "qwen2_moe")


@pytest.fixture(scope="module")
def written(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("im") / "imatrix.gguf"
    path, im = imatrix(str(model_dir), out, max_memory="0", progress=False, **TOKENS)  # streamed
    return path, im


@torch.no_grad()
def test_sums_and_counts_equal_a_direct_computation(model_dir, written):
    """Each entry is the sum of x^2 over the tokens the tensor's rows saw, recomputed here from the
    resident model with its own router: attention over every token, each expert over its routed ones."""
    path, _ = written
    im = read(path)
    loaded = load_model(str(model_dir))
    model, adapter = loaded.model.eval(), get_adapter(loaded.model)
    ids = load_token_sets(loaded.tokenizer, "demo", **TOKENS).calib.input_ids
    modules = dict(model.named_modules())
    block = adapter.moe_blocks[-1]
    L = block.layer
    seen: dict[str, list] = {}
    hooks = [modules[p].register_forward_hook(lambda m, a, o, p=p: seen.setdefault(p, []).append(a[0].detach()))
             for p in (block.path, f"model.layers.{L}.self_attn.o_proj", f"model.layers.{L}.self_attn.q_proj")]
    for batch in ids.split(8):
        model(input_ids=batch)
    for h in hooks:
        h.remove()

    def rows(p):
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[p]]).double()

    for proj, name in (("q_proj", "attn_q"), ("o_proj", "attn_output")):
        x = rows(f"model.layers.{L}.self_attn.{proj}")
        np.testing.assert_allclose(im.sums[f"blk.{L}.{name}.weight"][0], (x * x).sum(0).numpy(), rtol=1e-4)
        assert im.counts[f"blk.{L}.{name}.weight"].tolist() == [ids.numel()]
    x = rows(block.path)
    _, _, chosen = block.router(x.float())
    gate, down = im.sums[f"blk.{L}.ffn_gate_exps.weight"], im.sums[f"blk.{L}.ffn_down_exps.weight"]
    assert gate.shape == (block.num_experts, x.shape[1])
    for e in range(block.num_experts):
        X = x[(chosen == e).any(-1)]
        key = f"{block.experts_path}.{e}"
        h = F.silu(F.linear(X, adapter.weight(f"{key}.gate_proj").double())) * F.linear(
            X, adapter.weight(f"{key}.up_proj").double())
        assert im.counts[f"blk.{L}.ffn_up_exps.weight"][e] == X.shape[0]
        np.testing.assert_allclose(gate[e], (X * X).sum(0).numpy(), rtol=1e-4)
        np.testing.assert_allclose(down[e], (h * h).sum(0).numpy(), rtol=1e-4)


def test_the_file_has_llama_imatrix_layout(written):
    """What llama.cpp's loader (common/imatrix-loader.cpp) reads: general.type, the three imatrix
    keys, and per weight F32 ``.in_sum2`` of ggml shape [inputs, experts] and ``.counts`` [1, experts]."""
    from gguf import GGMLQuantizationType, GGUFReader

    path, im = written
    r = GGUFReader(path)
    assert str(r.fields["general.type"].contents()) == "imatrix"
    assert r.fields["imatrix.chunk_count"].contents() == im.chunk_count == 256 // 32
    assert r.fields["imatrix.chunk_size"].contents() == 32
    assert r.fields["imatrix.datasets"].contents() == ["demo (seed 0)"]
    tensors = {t.name: t for t in r.tensors}
    t, c = tensors["blk.1.ffn_down_exps.weight.in_sum2"], tensors["blk.1.ffn_down_exps.weight.counts"]
    assert [int(d) for d in t.shape] == [32, 4] and [int(d) for d in c.shape] == [1, 4]
    assert {t.tensor_type for t in r.tensors} == {GGMLQuantizationType.F32}
    assert len(tensors) == 2 * len(im.sums)


def test_mean_square_is_what_llama_quantize_weights_by():
    from paretoq.export.imatrix import Imatrix

    im = Imatrix({"w": np.array([[2.0, 4.0], [3.0, 3.0]], np.float32)}, {"w": np.array([2.0, 0.0], np.float32)})
    np.testing.assert_array_equal(im.mean_square("w"), [[1.0, 2.0], [1.0, 1.0]])  # no token: uniform


def test_an_imatrix_of_another_model_is_refused(written, tmp_path, model_dir):
    path, _ = written
    assert check(path, get_adapter(load_model(str(model_dir), weights=False).model)).sums  # its own model: fine
    other = save_tiny_with_demo_tokenizer(tmp_path / "wide", "qwen2_moe", hidden_size=96)
    with pytest.raises(ParetoqError, match="imatrix of another model"):
        check(path, get_adapter(load_model(str(other), weights=False).model))


def test_a_gguf_that_is_not_an_imatrix_is_refused(tmp_path):
    from gguf import GGUFWriter

    w = GGUFWriter(tmp_path / "model.gguf", "qwen2moe")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ParetoqError, match="not an imatrix"):
        read(tmp_path / "model.gguf")


def test_bad_files_fail_with_one_line(written, tmp_path, model_dir):
    path, _ = written
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ParetoqError, match="not a readable GGUF imatrix"):
        read(truncated)
    with pytest.raises(ParetoqError, match="does not exist"):
        read(tmp_path / "none.gguf")
    r = subprocess.run([sys.executable, "-m", "paretoq.cli", "imatrix", "--model", str(model_dir), "--out",
                        str(tmp_path / "missing" / "im.gguf")], capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "missing").exists()


def test_the_llamacpp_export_carries_a_checked_imatrix(written, model_dir, tmp_path, capsys):
    from paretoq.cli import main
    from paretoq.plan import Plan

    path, _ = written
    adapter = load_model(str(model_dir), weights=False).adapter
    Plan.uniform(adapter, 4).save(tmp_path / "plan.json", adapter)
    out = tmp_path / "export"
    assert main(["export", "--plan", str(tmp_path / "plan.json"), "--format", "llamacpp", "--model", str(model_dir),
                 "--out", str(out), "--imatrix", str(path)]) == 0
    said = capsys.readouterr().out
    assert (out / "imatrix.gguf").read_bytes() == path.read_bytes()
    assert f"llama-quantize --imatrix {out}/imatrix.gguf --tensor-type-file" in said
    # an imatrix of another model, or for another format: one line, exit 2, no export directory
    other = save_tiny_with_demo_tokenizer(tmp_path / "wide", "qwen2_moe", hidden_size=96)
    for fmt, model, message in (("llamacpp", other, "imatrix of another model"), ("gptqmodel", model_dir, "--imatrix is for")):
        Plan.uniform(load_model(str(model), weights=False).adapter, 4).save(tmp_path / "p.json")
        r = subprocess.run([sys.executable, "-m", "paretoq.cli", "export", "--plan", str(tmp_path / "p.json"),
                            "--format", fmt, "--model", str(model), "--out", str(tmp_path / "bad"),
                            "--imatrix", str(path)], capture_output=True, text=True)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "bad").exists()
