"""paretoq: Pareto-optimal mixed-precision quantization plans for Mixture-of-Experts models."""


def load_quantized(path, dtype=None, device="cpu"):
    """Rebuild a model from a `paretoq quantize` checkpoint (see paretoq.quant.checkpoint)."""
    import torch

    from paretoq.quant.checkpoint import load_quantized as _load

    return _load(path, dtype=dtype or torch.float32, device=device)
