#!/usr/bin/env bash
# Issue 16's acceptance run: a random-initialised qwen3_moe with Qwen3-30B-A3B's layer shape (hidden
# 2048, 128 experts of 768, top-8, 32 query and 4 key-value heads of 128, vocabulary 151,936, bf16:
# 1.2 GB a layer) and enough layers that its weights exceed 3x the memory cap; each stage in a
# memory cgroup capped at CAP GiB (run_capped.sh, as root).
#
#   bash studies/scale/qwen3_30b.sh WORK_DIR [CAP_GIB=8] [LAYERS=20]
#
# GPTQ uses the min-max grid (--grid minmax, a fifth of the default's time on 2 CPU cores); memory
# does not depend on the grid. The model is written once into WORK_DIR and reused.
set -euo pipefail
work=$1; cap_gib=${2:-8}; layers=${3:-20}
here="$(cd "$(dirname "$0")" && pwd)"
model="$work/qwen3-30b-shape-$layers"
mkdir -p "$work"
if [ ! -f "$model/config.json" ]; then
    python "$here/make_model.py" --out "$model" --layers "$layers" --hidden 2048 --experts 128 --expert-size 768 \
        --top-k 8 --heads 32 --kv-heads 4 --head-dim 128 --vocab 151936 --dtype bfloat16
fi
echo "{\"model_bytes\": $(du -sb "$model" | cut -f1), \"cap_bytes\": $((cap_gib << 30)), \"layers\": $layers}"
PARETOQ_CACHE="$work/cache" QUANT="--grid minmax" bash "$here/run_capped.sh" "$model" $((cap_gib << 30)) \
    probe search quantize eval
