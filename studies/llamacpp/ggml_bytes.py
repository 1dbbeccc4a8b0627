"""paretoq's ggml quantizers (`paretoq.quant.ggml`) against llama-quantize's output, byte for byte.

    python studies/llamacpp/ggml_bytes.py LLAMA_CPP_DIR [--work /tmp/paretoq-imatrix]
                                          [--ftypes Q2_K,Q3_K_S,Q4_K_S,Q5_K_S,Q6_K,Q8_0]

In --work: the demo's f32 GGUF from llama.cpp's converter and paretoq's imatrix (imatrix.py makes
both). For each ftype, ``llama-quantize --pure`` (every tensor at the ftype's type) with and
without ``--imatrix``; then every quantized tensor of the output is compared with
``paretoq.quant.ggml.quantize`` of the same f32 tensor, given the same importance (the imatrix's
mean squares; per expert for stacked expert tensors). Prints, per file, how many tensors match
exactly; exits 1 if any differs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from paretoq.export.imatrix import read
from paretoq.quant.ggml import TYPES, quantize


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("llama_cpp", type=Path)
    p.add_argument("--work", type=Path, default=Path("/tmp/paretoq-imatrix"))
    p.add_argument("--ftypes", default="Q2_K,Q3_K_S,Q4_K_S,Q5_K_S,Q6_K,Q8_0")
    a = p.parse_args()
    f32 = {t.name: t for t in GGUFReader(a.work / "model-f32.gguf").tensors}
    imatrix_path = a.work / "paretoq.imatrix.gguf"
    im = read(imatrix_path)
    bad = 0
    for ftype in a.ftypes.split(","):
        for with_im in (False, True):
            out = a.work / f"pure-{ftype}{'-im' if with_im else ''}.gguf"
            args = [str(a.llama_cpp / "build" / "bin" / "llama-quantize"), "--pure"]
            args += ["--imatrix", str(imatrix_path)] if with_im else []
            subprocess.run([*args, str(a.work / "model-f32.gguf"), str(out), ftype], check=True, capture_output=True)
            same, differ, types = 0, [], set()
            plain = {t.name: np.asarray(t.data) for t in GGUFReader(a.work / f"pure-{ftype}.gguf").tensors}
            moved = 0  # tensors the imatrix changed: the comparison then tests the weighting too
            for t in GGUFReader(out).tensors:
                moved += not np.array_equal(np.asarray(t.data), plain[t.name])
                name = t.tensor_type.name.lower()
                if name not in TYPES:  # norms and routers stay f32
                    continue
                types.add(name)
                src = np.asarray(f32[t.name].data, dtype=np.float32)
                stack = src.reshape(-1, *src.shape[-2:])  # [experts or 1, rows, n]
                want = np.asarray(t.data).reshape(stack.shape[0], stack.shape[1], -1)
                weights = im.mean_square(t.name) if with_im and t.name in im.sums else None
                for e in range(stack.shape[0]):
                    got = quantize(stack[e], name, None if weights is None else weights[e])
                    if not np.array_equal(got, want[e]):
                        differ.append(f"{t.name}[{e}]")
                        break
                else:
                    same += 1
            bad += len(differ)
            print(f"{out.name}: {same} tensors ({', '.join(sorted(types))}) equal byte for byte, {len(differ)} differ"
                  + (f": {', '.join(differ[:5])}" if differ else "")
                  + (f"; {moved} differ from the file made without the imatrix" if with_im else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
