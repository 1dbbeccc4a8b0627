# The GPU check (studies/gpu/README.md): CUDA tests, then paretoq bench, logs to $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PARETOQ_CACHE=/tmp/pqcache
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  python3 -c "import torch, triton, transformers, optuna; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'optuna', optuna.__version__)"; } 2>&1 | tee $OUT/env.txt
SECONDS=0
timeout 200 python3 -m pytest -q -p no:cacheprovider -rs --durations=8 tests/test_qmm.py tests/test_fused_moe.py tests/test_kernel_layout.py tests/test_kernel_bench.py tests/test_runtime.py tests/test_kernel_compile.py 2>&1 | tee $OUT/tests.log
echo "tests took $SECONDS s" | tee -a $OUT/tests.log
SECONDS=0
python3 studies/gpu/demo_checkpoint.py /tmp/ckpt 2>&1 | tail -2
timeout 150 python3 -m paretoq.cli bench --shapes mixtral --checkpoint /tmp/ckpt --out $OUT/bench.json 2>&1 | tee $OUT/bench.txt
echo "bench took $SECONDS s" | tee -a $OUT/bench.txt
SECONDS=0
timeout 150 python3 -m paretoq.cli bench --shapes mixtral --tune --out $OUT/bench_tuned.json 2>&1 | tee $OUT/bench_tuned.txt
echo "tune took $SECONDS s" | tee -a $OUT/bench_tuned.txt
cp /tmp/pqcache/kernels/*.json $OUT/ 2>/dev/null; ls $OUT
