"""Time of ggml's quantizers (paretoq.quant.ggml.quantize) at a real expert's shape, by thread count.

    python studies/scale/ggml_quantize_time.py [--shape 768,2048] [--matrices 4] [--threads 1,2] [--repeats 3]

`search --target llamacpp` quantizes every component at each of q2_k, q3_k, q4_k, q5_k, q6_k and
q8_0 in its calibration walk. This prints, per type and thread count, the median seconds to
quantize ``--matrices`` random matrices of ``--shape`` with an importance matrix (as the walk does),
the speed-up over one thread measured side by side, and what the six types cost a model of
Qwen3-30B-A3B's size (30.5e9 weights) at that rate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from paretoq.quant import ggml

TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")
QWEN3_30B_WEIGHTS = 30.5e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="768,2048")
    p.add_argument("--matrices", type=int, default=4)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    rows, n = map(int, a.shape.split(","))
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal((rows, n)).astype(np.float32) for _ in range(a.matrices)]
    imatrix = rng.lognormal(0, 1, n).astype(np.float32)
    counts = [int(t) for t in a.threads.split(",")]
    weights = a.matrices * rows * n
    print(f"{a.matrices} matrices of {rows}x{n}, importance matrix, median of {a.repeats}")
    print("| type | " + " | ".join(f"{t} thread(s)" for t in counts) + " | speed-up | all six types, Qwen3-30B-A3B |")
    total = dict.fromkeys(counts, 0.0)
    for name in TYPES:
        times = {t: [] for t in counts}
        for _ in range(a.repeats):
            for t in counts:  # interleaved, so that load on the machine falls on every count alike
                ggml.threads = lambda t=t: t
                start = time.perf_counter()
                for W in mats:
                    ggml.quantize(W, name, imatrix)
                times[t].append(time.perf_counter() - start)
        med = {t: statistics.median(v) for t, v in times.items()}
        for t in counts:
            total[t] += med[t]
        print(f"| {name} | " + " | ".join(f"{med[t]:.3f} s" for t in counts) +
              f" | {med[counts[0]] / med[counts[-1]]:.2f}x | - |")
    print("| all six | " + " | ".join(f"{total[t]:.3f} s" for t in counts) +
          f" | {total[counts[0]] / total[counts[-1]]:.2f}x | " +
          ", ".join(f"{total[t] / weights * QWEN3_30B_WEIGHTS / 3600:.1f} h at {t}" for t in counts) + " |")


if __name__ == "__main__":
    main()
