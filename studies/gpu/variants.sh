# Second and third GPU runs of 2026-12-04 (docs/benchmarks.md): the CUDA tests of the kernels and
# the runtime, then a study script (argument: gemv_variants or split_k), logs to $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PARETOQ_CACHE=/tmp/pqcache
timeout 100 python3 -m pytest -q -p no:cacheprovider -x tests/test_qmm.py tests/test_fused_moe.py tests/test_runtime.py -k "not generate and not torch" 2>&1 | tail -3 | tee $OUT/tests.log
timeout 200 python3 studies/gpu/${1:-split_k}.py 2>&1 | tee $OUT/study.txt | grep -E "BEST|align|Error|copy,"
