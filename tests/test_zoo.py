import json
import math

import pytest
import torch
import torch.nn.functional as F

from paretoq.data import load_token_sets
from paretoq.errors import ParetoqError
from paretoq.models import load_model
from paretoq.models.loading import demo_dir
from paretoq.zoo import corpus
from paretoq.zoo.train import TrainConfig, balance_loss, train_demo


@pytest.fixture(scope="module")
def demo():
    return load_model("demo")


def test_demo_meets_the_spec(demo):
    cfg, adapter = demo.model.config, demo.adapter
    assert cfg.model_type == "deepseek_v3" and cfg.hidden_size % 128 == 0
    assert len(adapter.moe_blocks) >= 4
    assert all(b.num_experts >= 8 and b.top_k == 2 for b in adapter.moe_blocks)
    assert {c.kind for c in adapter.components} == {"attn", "dense", "shared", "expert"}
    # llama.cpp's K-quants work on 256-wide rows: every component's input dimension is a multiple of 256
    assert all(c.shape[1] % 256 == 0 for c in adapter.components)
    assert cfg.q_lora_rank is not None
    assert (demo_dir() / "model.safetensors").stat().st_size <= 25 * 2**20


def test_demo_is_trained_and_routes_unevenly(demo):
    """Perplexity on held-out text far below a unigram model fitted to that very text's other half."""
    sets = load_token_sets(demo.tokenizer, "demo", calib_tokens=8192, eval_tokens=4096)
    vocab = demo.model.config.vocab_size
    counts = torch.bincount(sets.calib.input_ids.flatten(), minlength=vocab).double() + 1
    unigram = math.exp(-(counts / counts.sum()).log()[sets.eval.input_ids[:, 1:]].mean().item())
    usage = torch.zeros(len(demo.adapter.moe_blocks), demo.adapter.num_experts)
    with torch.no_grad():
        out = demo.model(sets.eval.input_ids, output_router_logits=True)
    logp = F.log_softmax(out.logits[:, :-1], dim=-1)
    ppl = math.exp(-logp.gather(-1, sets.eval.input_ids[:, 1:, None]).mean().item())
    assert ppl < unigram / 10, (ppl, unigram)
    for i, logits in enumerate(out.router_logits):
        usage[i] = torch.bincount(logits.sigmoid().topk(2, dim=-1).indices.flatten(), minlength=usage.shape[1])
    assert (usage > 0).all()  # no dead experts
    assert (usage.max(1).values / usage.min(1).values).max() > 1.2  # routers are not uniform


def test_balance_loss_analytic():
    E, k = 8, 2
    pairs = torch.tensor([[t % E, (t + 1) % E] for t in range(E)])
    balanced = torch.full((E, E), -20.0).scatter_(1, pairs, 20.0)
    collapsed = torch.full((E, E), -20.0)
    collapsed[:, :2] = 20.0
    assert balance_loss((balanced,), k).item() == pytest.approx(1.0, abs=1e-4)  # f_e = P_e = 1/E
    assert balance_loss((collapsed,), k).item() == pytest.approx(E / 2, abs=1e-3)  # f = P = (1/2, 1/2, 0, ...)


def test_heldout_split_is_by_path_and_shipped_text_is_heldout():
    shipped = [json.loads(line) for line in open(demo_dir() / "heldout.jsonl")]
    assert shipped and all(corpus.is_heldout(d["path"]) for d in shipped)
    assert sum(len(d["text"]) for d in shipped) <= corpus.HELDOUT_SHIPPED_CHARS


@pytest.mark.slow
def test_train_writes_a_loadable_model_atomically(tmp_path, monkeypatch):
    train, heldout = corpus.split_stdlib()
    monkeypatch.setattr(corpus, "split_stdlib", lambda root=None: (train[:40], heldout[:8]))
    out = tmp_path / "demo"
    stats = train_demo(out, TrainConfig(steps=2, batch_size=2, vocab_size=512))
    loaded = load_model(out)
    assert loaded.model.config.vocab_size == 512 and len(loaded.tokenizer) == 512
    assert stats["heldout_ppl"] > 0 and len(stats["usage_max_min_ratio"]) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary directory left behind
    with pytest.raises(ParetoqError, match="already exists"):
        train_demo(out, TrainConfig(steps=1))
