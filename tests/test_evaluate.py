import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from paretoq.data import TokenSet
from paretoq.evaluate import Assembler, compute_reference, evaluate
from paretoq.models import get_adapter


def _ids(n=4, seq=24, seed=0):
    return torch.randint(3, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _perturbed(model_type="qwen2_moe", scale=0.3):
    """The fp model and a copy with noisy weights (a stand-in candidate)."""
    fp, q = tiny_model(model_type), tiny_model(model_type)
    with torch.no_grad():
        for c in get_adapter(q).components:
            W = get_adapter(q).weight(c)
            W.add_(scale * W.std() * torch.randn_like(W))
    return fp, q


def _direct(fp, q, ids):
    with torch.no_grad():
        lp = F.log_softmax(fp(ids).logits[:, :-1].double(), -1)
        lq = F.log_softmax(q(ids).logits[:, :-1].double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    ppl = math.exp(-lq.gather(-1, ids[:, 1:, None]).mean().item())
    agree = (lp.argmax(-1) == lq.argmax(-1)).double().mean().item()
    return kl, ppl, agree, lp, lq


def test_kl_is_zero_for_the_fp_model_and_matches_a_full_vocabulary_computation():
    fp, q = _perturbed()
    ids = _ids()
    ref = compute_reference(fp, TokenSet(ids, "t"), batch_size=3)
    assert ref.exact
    same = evaluate(fp, ref, batch_size=3)
    assert abs(same.kl) < 1e-7 and same.agreement == 1.0 and same.ppl == pytest.approx(ref.ppl)
    kl, ppl, agree, _, _ = _direct(fp, q, ids)
    got = evaluate(q, ref, batch_size=3)
    assert got.kl > 0
    assert got.kl == pytest.approx(kl, rel=1e-4)
    assert got.ppl == pytest.approx(ppl, rel=1e-5) and got.agreement == pytest.approx(agree)
    # each window's own KL, in order, across batch boundaries (batch 3 of 4 windows), exact and top-k
    _, _, _, lp, lq = _direct(fp, q, ids)
    per_window = (lp.exp() * (lp - lq)).sum(-1).mean(-1)
    assert got.kl_windows == pytest.approx(per_window.tolist(), rel=1e-4)
    top = compute_reference(fp, TokenSet(ids, "t"), max_bytes=0, top_k=8, batch_size=3)
    approx = evaluate(q, top, batch_size=3)
    assert sum(approx.kl_windows) / len(approx.kl_windows) == pytest.approx(approx.kl, rel=1e-6)
    assert all(a <= w + 1e-6 for a, w in zip(approx.kl_windows, per_window.tolist()))  # a lower bound, window by window


def test_top_k_kl_is_a_lower_bound_with_the_documented_gap():
    fp, q = _perturbed(scale=0.5)
    ids = _ids()
    ref = compute_reference(fp, TokenSet(ids, "t"), max_bytes=0, top_k=8)
    assert not ref.exact
    approx = evaluate(q, ref).kl
    kl, _, _, lp, lq = _direct(fp, q, ids)
    # gap = sum_t p_tail,t * KL(p(.|tail) || q(.|tail)), averaged over positions
    top = lp.topk(8, dim=-1).indices
    tail = torch.ones_like(lp, dtype=torch.bool).scatter_(-1, top, False)
    p_tail = (lp.exp() * tail).sum(-1)
    q_tail = (lq.exp() * tail).sum(-1)
    inside = (lp.exp() * tail * ((lp - p_tail.log()[..., None]) - (lq - q_tail.log()[..., None]))).sum(-1)
    gap = inside.mean().item()
    assert 0 <= approx <= kl
    assert approx + gap == pytest.approx(kl, rel=1e-3)


def test_router_aux_loss_never_reaches_perplexity():
    fp, q = _perturbed("mixtral")
    q.config.output_router_logits = True  # would add router_aux_loss_coef * aux to a loss computed with labels
    ids = _ids()
    ref = compute_reference(fp, TokenSet(ids, "t"))
    _, ppl, _, _, _ = _direct(fp, q, ids)
    assert evaluate(q, ref).ppl == pytest.approx(ppl, rel=1e-5)


def test_assembly_restores_bit_identical_weights():
    model = tiny_model("gpt_oss")
    adapter = get_adapter(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fake = {}

    def weight_of(key, bits):  # any deterministic "quantized" weight
        return fake.setdefault((key, bits), torch.round(adapter.weight(key).detach() * bits) / bits)

    asm = Assembler(adapter, weight_of)
    keys = [c.key for c in adapter.components]
    g = torch.Generator().manual_seed(0)
    for trial in range(6):
        chosen = [k for k in keys if torch.rand(1, generator=g) < 0.6]
        bits = {k: (2, 3, 4, 8)[int(torch.randint(4, (1,), generator=g))] for k in chosen}
        with asm.apply(bits):
            assert all(torch.equal(adapter.weight(k), weight_of(k, b)) for k, b in bits.items())
    with pytest.raises(RuntimeError), asm.apply({keys[0]: 2}):
        raise RuntimeError("a failing evaluation still restores")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
