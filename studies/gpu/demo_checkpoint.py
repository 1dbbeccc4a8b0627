"""The demo at mixed widths (RTN), for `paretoq bench --checkpoint` (same as tests/test_runtime.py's fixture)."""
import sys
from paretoq.models import load_model
from paretoq.plan import Plan
from paretoq.quant.checkpoint import save_quantized
from paretoq.quant.quantizer import QuantSettings, rtn

loaded = load_model("demo")
tensors = {}
for i, c in enumerate(loaded.adapter.components):
    gs = 128 if c.shape[1] % 128 == 0 else -1
    tensors[c.key] = rtn(loaded.adapter.weight(c).detach(), (2, 3, 4, 8)[i % 4], gs)
plan = Plan({k: q.bits for k, q in tensors.items()}, QuantSettings(group_size=128))
print(save_quantized(loaded, plan, tensors, sys.argv[1]))
