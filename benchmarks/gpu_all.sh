#!/usr/bin/env bash
# Every GPU check and benchmark of the project, in as few device calls as the 10-minute limit allows.
#   bash benchmarks/gpu_all.sh core      # GPU tests, kernel benchmark (T=0.9, 1, 0), learner benchmark
#   bash benchmarks/gpu_all.sh sampler   # end-to-end sampler vs LLaDA's reference, LLaDA-8B shape
#   bash benchmarks/gpu_all.sh cache     # block KV cache none/prefix/dual beside the reference, LLaDA-8B shape
# On the lent device machine: source .devicepkgs/activate.sh first (ray, pydantic). Results go to $OUT
# (default /tmp/unmask-gpu): markdown + JSON per benchmark and one log; a short table prints last.
set -uo pipefail
stage=${1:-core}
OUT=${OUT:-/tmp/unmask-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
log="$OUT/$stage.log"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$log"
if [ "$stage" = core ]; then
  timeout 240 python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_kernels.py tests/test_sampler.py \
    tests/test_cache.py tests/test_weight_sync.py tests/test_model.py 2>&1 | tee -a "$log"
  for t in 0.9 1.0 0.0; do
    timeout 120 python3 -m benchmarks.bench_kernel --temperature "$t" --out "$OUT/kernel_T$t.md" 2>&1 | tee -a "$log"
  done
  timeout 200 python3 -m benchmarks.bench_learner --out "$OUT" 2>&1 | tee -a "$log"
  echo "=== summary"; cat "$OUT"/kernel_T0.9.md "$OUT"/bench_learner.md 2>/dev/null | grep "|"
elif [ "$stage" = sampler ]; then
  timeout 560 python3 -m benchmarks.bench_sampler --out "$OUT/sampler.md" 2>&1 | tee -a "$log"
  echo "=== summary"; grep "|" "$OUT/sampler.md"
elif [ "$stage" = cache ]; then
  # tok/s at batch 1/8/32, prompt 64, gen 256, block 32, 128 steps, greedy, random bf16 weights: LLaDA's
  # reference generate(), ours without a cache (reference-equivalent) and with the prefix / dual cache.
  timeout 560 python3 -m benchmarks.bench_cache --sections sampler --preset llada-8b --batches 1 8 32 --repeats 1 \
    --temperature 0 --tiny-batch 0 --reference --out "$OUT/cache_gpu.md" 2>&1 | tee -a "$log"
  echo "=== summary"; grep "|" "$OUT/cache_gpu.md"
else
  echo "unknown stage $stage (core | sampler | cache)"; exit 2
fi
