"""llama.cpp's quantizers through ggml (paretoq.quant.ggml): sizes, an independent reference, and
round trips through gguf's own dequantizers. Byte identity with llama-quantize's output is checked
by studies/llamacpp/ggml_bytes.py (it needs a llama.cpp build)."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize

from paretoq.errors import ParetoqError
from paretoq.quant import ggml

# llama.cpp's own figures (ggml-common.h block layouts): bits per weight, scales included
BPW = {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625, "q8_0": 8.5, "q4_0": 4.5,
       "iq4_xs": 4.25}


def _w(rows=6, n=512, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, n)).astype(np.float32)


@pytest.mark.parametrize("name, bpw", BPW.items())
def test_bytes_per_type(name, bpw):
    W = _w()
    data = ggml.quantize(W, name)
    assert ggml.bits_per_weight(name) == bpw
    assert data.dtype == np.uint8 and data.shape == (W.shape[0], W.shape[1] * bpw / 8)


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q5_0"])
def test_equal_to_gguf_pys_own_quantizer(name):
    """gguf-py reimplements these in numpy: the same bytes from two implementations."""
    W = _w(seed=1) * 3
    assert np.array_equal(ggml.quantize(W, name), gguf_quantize(W, GGMLQuantizationType[name.upper()]))


def test_round_trip_error_falls_with_the_bits():
    W = _w(rows=16, seed=2)
    rel = {t: float(np.linalg.norm(ggml.round_trip(W, t) - W) / np.linalg.norm(W))
           for t in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")}
    order = sorted(rel, key=lambda t: BPW[t])
    assert [rel[t] for t in order] == sorted(rel.values(), reverse=True), rel
    # a wrong block layout would dequantize to noise (relative error near or above 1)
    assert rel["q2_k"] < 0.4 and rel["q4_k"] < 0.1 and rel["q8_0"] < 0.01, rel


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k"])
def test_an_importance_matrix_lowers_the_weighted_error(name):
    """ggml's K-quants minimise the importance-weighted error when given one: columns with large
    activations come out closer."""
    W = _w(rows=32, seed=3)
    importance = np.random.default_rng(4).lognormal(0, 2, W.shape[1]).astype(np.float32)

    def weighted(R):
        return float((((R - W) ** 2) * importance).sum())

    assert weighted(ggml.round_trip(W, name, importance)) < 0.95 * weighted(ggml.round_trip(W, name))


def test_refusals_name_the_fix():
    with pytest.raises(ParetoqError, match="blocks are 256 wide; choose one of q8_0, q4_0, q5_0, iq4_nl"):
        ggml.quantize(_w(n=96), "q4_k")
    with pytest.raises(ParetoqError, match="needs an importance matrix"):
        ggml.quantize(_w(), "iq2_xs")
    with pytest.raises(ParetoqError, match="not a ggml type"):
        ggml.quantize(_w(), "q4_k_m")
    assert ggml.round_trip(_w(), "iq2_xs", np.ones(512, np.float32)).shape == (6, 512)
