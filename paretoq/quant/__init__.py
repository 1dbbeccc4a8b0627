"""Quantizers (RTN, GPTQ), packed tensors, the on-disk quant cache, and sequential quantization."""

BITS = (2, 3, 4, 8)  # the widths paretoq quantizes to (here, not in quantizer.py: the CLI reads it without torch)
