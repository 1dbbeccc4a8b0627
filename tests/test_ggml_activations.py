"""llama.cpp's activation rounding (paretoq.export.ggml_activations) against ggml's own CPU code,
and the evaluator applying it layer by layer as a whole-model forward would."""

import ctypes

import numpy as np
import pytest
import torch

from paretoq.export.ggml_activations import Q8_0, Q8_K, round_like_ggml, rounding_for

ggml = pytest.importorskip("ggml")  # the llamacpp extra: installed in CI


def ggml_round_trip(x: np.ndarray, qtype: int) -> np.ndarray:
    """Quantize ``x`` rows with ggml's CPU ``from_float`` for ``qtype`` (what ggml_mul_mat runs on the
    activations) and read the values back from the block bytes."""
    traits = ggml.ggml_get_type_traits_cpu(qtype).contents
    base = ggml.ggml_get_type_traits(qtype).contents
    n = x.size
    out = (ctypes.c_uint8 * (n // base.blck_size * base.type_size))()
    src = np.ascontiguousarray(x, dtype=np.float32)
    traits.from_float(src.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), ctypes.cast(out, ctypes.c_void_p), n)
    raw = np.frombuffer(out, dtype=np.uint8).reshape(-1, base.type_size)
    if qtype == ggml.GGML_TYPE_Q8_K:  # {float d; int8 qs[256]; int16 bsums[16]}
        d = raw[:, :4].copy().view(np.float32)
        qs = raw[:, 4:260].copy().view(np.int8).astype(np.float32)
    else:  # q8_0 {half d; int8 qs[32]}; q8_1 {half d; half s; int8 qs[32]}
        d = raw[:, :2].copy().view(np.float16).astype(np.float32)
        qs = raw[:, base.type_size - 32:].copy().view(np.int8).astype(np.float32)
    return (qs * d).reshape(x.shape)


@pytest.mark.parametrize("qtype,rounding", [("Q8_K", Q8_K), ("Q8_0", Q8_0), ("Q8_1", Q8_0)])
def test_equal_to_ggmls_own_activation_quantizer(qtype, rounding):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1024, generator=g) * torch.logspace(-3, 2, 1024)[torch.randperm(1024, generator=g)]
    x[2, :256] = 0  # an all-zero block
    want = ggml_round_trip(x.numpy(), getattr(ggml, f"GGML_TYPE_{qtype}"))
    got = round_like_ggml(x, *rounding).numpy()
    assert np.array_equal(got, want), np.abs(got - want).max()
    assert not np.array_equal(got, x.numpy())  # it rounds


def test_rounding_per_type_is_ggmls_vec_dot_type():
    """The table of `rounding_for` against ggml's CPU type traits, for every type gguf names."""
    from gguf import GGMLQuantizationType

    by_dot = {ggml.GGML_TYPE_Q8_K: Q8_K, ggml.GGML_TYPE_Q8_0: Q8_0, ggml.GGML_TYPE_Q8_1: Q8_0}
    checked = 0
    for t in GGMLQuantizationType:
        code = getattr(ggml, f"GGML_TYPE_{t.name}", None)
        if code is None or t.name in ("Q8_K", "I8", "I16", "I32", "I64", "F64"):
            continue
        traits = ggml.ggml_get_type_traits_cpu(code)
        if not traits or not traits.contents.vec_dot:
            continue
        dot = traits.contents.vec_dot_type
        want = None if dot in (ggml.GGML_TYPE_F32, ggml.GGML_TYPE_F16, ggml.GGML_TYPE_BF16) else by_dot[dot]
        assert rounding_for(t.name) == want, t.name
        checked += 1
    assert checked >= 20


def test_every_linear_call_on_a_paired_weight_is_rounded_however_it_was_bound():
    """nn.Linear, F.linear looked up at call time, a ``linear`` bound at import and keyword arguments
    all take the rounded input for a paired weight; other weights, and everything after, do not."""
    from torch.nn.functional import linear as bound_at_import

    from paretoq.export.ggml_activations import rounded_linear_inputs

    torch.manual_seed(0)
    lin, other = torch.nn.Linear(256, 8), torch.nn.Linear(256, 8)
    x = torch.randn(3, 256)
    exact = torch.nn.functional.linear(x, lin.weight, lin.bias)
    want = torch.nn.functional.linear(round_like_ggml(x, *Q8_K), lin.weight, lin.bias)
    assert not torch.allclose(want, exact)
    with torch.no_grad(), rounded_linear_inputs([(lin.weight, Q8_K)]):
        for got in (lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias), bound_at_import(x, lin.weight, lin.bias),
                    torch.nn.functional.linear(input=x, weight=lin.weight, bias=lin.bias)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(other(x), torch.nn.functional.linear(x, other.weight, other.bias), rtol=0, atol=0)
    torch.testing.assert_close(lin(x), exact, rtol=0, atol=0)
