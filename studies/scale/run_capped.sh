#!/usr/bin/env bash
# Run paretoq stages inside a memory cgroup (v1, as root) capped at CAP bytes, each in its own process,
# and print per stage: exit code, wall seconds, peak RSS of the process and the cgroup's peak usage.
#
#   bash studies/scale/run_capped.sh MODEL_DIR CAP_BYTES STAGE [STAGE ...]     (STAGE: probe | eval | search | quantize)
#
# QUANT (environment): quantizer flags for search, quantize and eval, e.g. QUANT="--grid minmax".
# TOKENS (environment): replaces the token flags (default "--calib-tokens 512 --eval-tokens 512 --seq-len 128").
# SEARCH (environment): extra flags for search only, e.g. SEARCH="--sensitivity lowest".
# PARETOQ_CACHE (environment): the cache (default: a new directory beside the outputs), shared by the stages.
# WORK (environment): the directory for outputs and the study (default: a new one); a stage run again with
#   the same WORK resumes (an interrupted search continues its study).
# The model is made by studies/scale/make_model.py. Results go to stdout as one JSON line per stage.
set -euo pipefail
model=$1; cap=$2; shift 2
here="$(cd "$(dirname "$0")" && pwd)"
cg=/sys/fs/cgroup/memory/paretoq-scale-$$
mkdir "$cg"
trap 'rmdir "$cg" 2>/dev/null || true' EXIT
echo "$cap" > "$cg/memory.limit_in_bytes"
read -r -a tokens <<< "${TOKENS:---calib-tokens 512 --eval-tokens 512 --seq-len 128}"
common=(--model "$model" --max-memory 0 "${tokens[@]}")
read -r -a search_flags <<< "${SEARCH:-}"
work="${WORK:-$(mktemp -d)}"
export PARETOQ_CACHE="${PARETOQ_CACHE:-$work/cache}"
read -r -a quant <<< "${QUANT:-}"
for stage in "$@"; do
    case $stage in
        probe) args=(probe --out "$work/probe") ;;
        eval) args=(eval --uniform 4 --json "${quant[@]}") ;;
        search) args=(search --budget 3 --trials 10 --space layer-experts --bits 2,4
                      --storage "sqlite:///$work/study.db" --out "$work/search" "${quant[@]}" ${search_flags[@]+"${search_flags[@]}"}) ;;
        quantize) args=(quantize --uniform 4 --out "$work/q4" "${quant[@]}") ;;
    esac
    echo 0 > "$cg/memory.max_usage_in_bytes"
    start=$(date +%s)
    set +e
    sh -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' sh "$cg" \
        python "$here/peak.py" -- "${args[@]}" "${common[@]}" > "$work/$stage.out" 2> "$work/$stage.err"
    rc=$?
    set -e
    peak=$(tail -1 "$work/$stage.err" | grep -o '"peak_rss_bytes": [0-9]*' | grep -o '[0-9]*$' || echo null)
    echo "{\"stage\": \"$stage\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - start )), \"peak_rss_bytes\": ${peak:-null}, \"cgroup_max_usage_bytes\": $(cat "$cg/memory.max_usage_in_bytes"), \"cap_bytes\": $cap, \"failcnt\": $(cat "$cg/memory.failcnt")}"
done
