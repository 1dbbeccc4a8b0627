#!/usr/bin/env bash
# A --target llamacpp search at Qwen3-30B-A3B's shapes (2 decoder layers and the real vocabulary,
# 151,936 x 2,048, so the token embedding and output head are real-sized plan components) in a
# memory cgroup capped at 8 GiB (run_capped.sh, as root).
#
#   bash studies/scale/qwen3_30b_llamacpp.sh WORK_DIR
#
# Writes the model to WORK_DIR/model (once), the cache, study and outputs beside it; prints
# run_capped.sh's JSON line (seconds, peak resident memory, the cgroup's peak).
set -euo pipefail
work=$(mkdir -p "$1" && cd "$1" && pwd)
here="$(cd "$(dirname "$0")" && pwd)"
model="$work/model"
if [ ! -f "$model/config.json" ]; then
  python "$here/make_model.py" --out "$model" --layers 2 --hidden 2048 --experts 128 --expert-size 768 \
        --top-k 8 --heads 32 --kv-heads 4 --head-dim 128 --vocab 151936 --dtype bfloat16
fi
WORK="$work" PARETOQ_CACHE="$work/cache" TOKENS="--calib-tokens 256 --eval-tokens 384 --seq-len 128" \
  SEARCH="--sensitivity lowest --target llamacpp" \
  bash "$here/run_capped.sh" "$model" $((8 << 30)) search
