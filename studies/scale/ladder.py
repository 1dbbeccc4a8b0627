"""Peak memory of each streamed stage on random MoEs of one layer shape and several depths.

    python studies/scale/ladder.py --layers 2,8 [--hidden 512 --experts 64 --expert-size 256] [--grid minmax]

Each stage runs in its own process (`peak.py`) with `--max-memory 0` (always stream); the table
gives each stage's wall time and peak RSS per depth, and the growth from the shallowest to the
deepest model in units of one layer's weights (the aim: under 1.5 layers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_model import make_model  # noqa: E402

SHAPE = dict(hidden=512, experts=64, expert_size=256, top_k=8, heads=8, kv_heads=2, head_dim=64)
TOKENS = ["--calib-tokens", "512", "--eval-tokens", "256", "--seq-len", "64", "--quiet", "--dtype", "float32",
          "--max-memory", "0"]  # --max-memory last: run_stage drops it for a resident run


def stages(grid: str = "search") -> dict:
    """Stage name -> argv of the model directory and the work directory; GPTQ with ``grid``
    ("minmax" costs a fifth of the default shrink search: what a memory test needs)."""
    q = ["--grid", grid]
    return {
        "probe": lambda d, out: ["probe", "--model", d, "--out", str(out / "probe")],
        "search": lambda d, out: ["search", "--model", d, "--budget", "3", "--trials", "4", "--space", "layer-experts",
                                  "--bits", "2,4", "--storage", f"sqlite:///{out / 'study.db'}", "--out",
                                  str(out / "search"), *q],
        "quantize": lambda d, out: ["quantize", "--model", d, "--uniform", "4", "--out", str(out / "q4"), *q],
        "eval": lambda d, out: ["eval", "--model", d, "--uniform", "4", "--json", *q],
    }


STAGES = stages()


def layer_bytes(path: Path) -> int:
    """One decoder layer's weights in the compute dtype (float32)."""
    from safetensors import safe_open

    index = json.loads((path / "model.safetensors.index.json").read_text())
    params = 0
    for name in {f for k, f in index["weight_map"].items() if k.startswith("model.layers.0.")}:
        with safe_open(str(path / name), framework="pt") as fh:
            params += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys() if k.startswith("model.layers.0."))
    return params * 4


def run_stage(stage: str, model: Path, work: Path, streamed: bool = True, stages: dict = STAGES) -> dict:
    """Run one stage (of ``stages``) in a fresh process, with the cache under ``work`` (empty the
    first time); its exit code, seconds and peak RSS. ``streamed=False`` lets the model stay resident."""
    work.mkdir(parents=True, exist_ok=True)
    env = {**{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")},
           "PARETOQ_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    tokens = TOKENS if streamed else TOKENS[: TOKENS.index("--max-memory")]
    r = subprocess.run([sys.executable, str(HERE / "peak.py"), "--", *stages[stage](str(model), work), *tokens],
                       capture_output=True, text=True, env=env, cwd=work, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{stage} on {model} failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stderr.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="2,8")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--grid", default="search", choices=["search", "minmax"], help="GPTQ's grid (paretoq --grid)")
    for k, v in SHAPE.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    a = ap.parse_args()
    depths = [int(x) for x in a.layers.split(",")]
    shape = {k: getattr(a, k) for k in SHAPE}
    with tempfile.TemporaryDirectory() as tmp:
        models = {n: make_model(Path(tmp) / f"layers{n}", n, **shape) for n in depths}
        one = layer_bytes(models[depths[0]])
        print(f"shape {shape}; one layer {one / 2**20:.0f} MiB (float32)")
        print(f"{'stage':9s} " + " ".join(f"{n:>3d} layers: s, peak MiB" for n in depths) + "  growth (layers)")

        def row(name: str, res: dict[int, dict]) -> None:
            cells = " ".join(f"{res[n]['seconds']:>13.1f} {res[n]['peak_rss_bytes'] / 2**20:>9.0f}" for n in depths)
            growth = (res[depths[-1]]["peak_rss_bytes"] - res[depths[0]]["peak_rss_bytes"]) / one
            print(f"{name:9s} {cells}  {growth:+.2f}")

        for stage in a.stages.split(","):
            row(stage, {n: run_stage(stage, models[n], Path(tmp) / f"work{n}", stages=stages(a.grid))  # a cache per depth
                        for n in depths})
        # The control: the same probe with the model resident must grow by the extra layers.
        row("resident", {n: run_stage("probe", models[n], Path(tmp) / f"resident{n}", streamed=False) for n in depths})

if __name__ == "__main__":
    main()
