"""paretoq: Pareto-optimal mixed-precision quantization plans for Mixture-of-Experts models."""
