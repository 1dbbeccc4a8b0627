"""Quantizers (RTN, GPTQ), packed tensors, the on-disk quant cache, and sequential quantization."""
