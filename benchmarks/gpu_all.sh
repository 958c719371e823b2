#!/usr/bin/env bash
# Every GPU check and benchmark of the project, in as few device calls as the 10-minute limit allows.
#   bash benchmarks/gpu_all.sh core      # GPU tests, kernel benchmark (T=0.9, 1, 0), learner benchmark
#   bash benchmarks/gpu_all.sh sampler   # end-to-end sampler vs LLaDA's reference, LLaDA-8B shape
#   bash benchmarks/gpu_all.sh cache     # block KV cache none/prefix/dual beside the reference, LLaDA-8B shape
#   bash benchmarks/gpu_all.sh smoke     # 3 RL steps, 1b preset in bf16: learner GPU + rollout GPU over nccl
#   bash benchmarks/gpu_all.sh families  # our sampler at Dream-7B's and SDAR-8B's shapes (their own decoding)
#   bash benchmarks/gpu_all.sh llada2    # LLaDA2.0-mini's shape: our sampler, and the routing drift replay/recompute
#   bash benchmarks/gpu_all.sh dgemma    # DiffusionGemma-26B-A4B's shape: our sampler beside transformers' generate
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
  timeout 240 python3 -m pytest -p no:cacheprovider -q -m gpu tests/test_kernels.py tests/test_kernels_compile.py \
    tests/test_sampler.py tests/test_cache.py tests/test_weight_sync.py tests/test_model.py 2>&1 | tee -a "$log"
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
elif [ "$stage" = smoke ]; then
  # `unmask train` end to end: 3 AGRPO steps of the 1b preset (random bf16 weights, the char vocabulary), one
  # learner GPU and one rollout GPU, weights over nccl, on-policy (tiny_countdown: max_staleness 0). The
  # learner's mean |log(pi_learner / pi_sampler)| on the first inner epoch is then pure bf16 drift between
  # the sampler's forward + kernel and the learner's FSDP2 forward (0 in exact arithmetic).
  # With one GPU the two share it (0.5 each) and weights go by cuda_ipc: NCCL cannot put two ranks on one GPU.
  if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then gpus=1 transport=nccl; else gpus=0.5 transport=cuda_ipc; fi
  timeout 540 python3 -m driver train --config tiny_countdown --set run.root="$OUT/smoke_runs" --set run.name=smoke \
    --set model.path=null --set model.preset=1b --set model.vocab_size=101 --set model.dtype=bfloat16 \
    --set learner.param_dtype=bfloat16 --set learner.num_gpus_per_rank=$gpus --set learner.weight_transport=$transport \
    --set rollout.num_gpus_per_worker=$gpus --set rollout.num_workers=1 --set rollout.group_size=4 \
    --set learner.groups_per_step=2 --set run.total_steps=3 --set run.eval_every=0 --set 'run.eval_sampling_steps=[]' \
    --set task.eval_size=16 2>&1 | tee -a "$log"
  echo "=== summary (weights by $transport)"
  python3 - "$OUT/smoke_runs" <<'PY' | tee -a "$log"
import json, pathlib, sys
runs = sorted(pathlib.Path(sys.argv[1]).glob("smoke-*/metrics.jsonl"))
steps = [r for r in map(json.loads, runs[-1].read_text().splitlines()) if "abs_log_ratio_sum" in r] if runs else []
print("| step | scored tokens | mean abs log-ratio (learner vs sampler, bf16) | ratio std |\n|---|---:|---:|---:|")
for r in steps:
    n = max(r["scored_tokens"], 1)
    mean = r["ratio_sum"] / n
    print(f"| {r['step']} | {r['scored_tokens']:.0f} | {r['abs_log_ratio_sum'] / n:.2e} | {max(r['ratio_sq_sum'] / n - mean ** 2, 0) ** 0.5:.2e} |")
sys.exit(0 if len(steps) == 3 else 1)
PY
elif [ "$stage" = families ]; then
  # greedy tok/s at batch 1 and 8, prompt 64, gen 256, random bf16 weights: Dream-v0-Instruct-7B's shape decoded
  # as diffusion_generate (one block, timestep schedule, 256 steps), SDAR-8B's block by block (blocks of 4,
  # 4 steps each: 256 steps). No reference rows: the public decoders are not on the device.
  timeout 280 python3 -m benchmarks.bench_sampler --preset dream-7b --block 256 --steps 256 --batches 1 8 \
    --temperatures 0 --compile-modes --out "$OUT/sampler_dream.md" 2>&1 | tee -a "$log"
  timeout 280 python3 -m benchmarks.bench_sampler --preset sdar-8b --steps 256 --batches 1 8 \
    --temperatures 0 --compile-modes --out "$OUT/sampler_sdar.md" 2>&1 | tee -a "$log"
  echo "=== summary"; grep "|" "$OUT/sampler_dream.md" "$OUT/sampler_sdar.md"
elif [ "$stage" = llada2 ]; then
  # LLaDA2.0-mini's shape (16B mixture of experts, 256 experts, 8 a token; random bf16 weights): greedy tok/s at
  # batch 1 and 8, prompt 64, gen 256, decoded as its generate() does (blocks of 32, 32 steps a block, threshold
  # 0.95 over the linear schedule). Then the log-ratio drift between a bf16 rollout (record_routing) and a bf16
  # learner rescoring every draw, with the learner replaying or recomputing the routing (8 sequences).
  # No learner row: a 16B full-parameter learner does not fit one GPU (the preset trains LoRA on 4 ranks).
  timeout 300 python3 -m benchmarks.bench_sampler --preset llada2-mini --steps 256 --batches 1 8 \
    --temperatures 0 --compile-modes --out "$OUT/sampler_llada2.md" 2>&1 | tee -a "$log"
  timeout 240 python3 -m benchmarks.bench_routing --out "$OUT" 2>&1 | tee -a "$log"
  echo "=== summary"; grep "|" "$OUT/sampler_llada2.md" "$OUT/bench_routing.md"
elif [ "$stage" = dgemma ]; then
  # tok/s at batch 1 and 8, prompt 64, 256 new tokens (one canvas), the public defaults (48 steps, entropy bound 0.1,
  # early stop), random bf16 weights at google/diffusiongemma-26B-A4B-it's text shape (50.5 GB): transformers'
  # generate and ours, same seed (the last column checks the tokens). No learner rows: full-parameter gradients of
  # the 25.3B text weights do not fit one GPU beside them (the learner needs FSDP2 over several, or LoRA).
  timeout 560 python3 -m benchmarks.bench_dgemma --preset dgemma-26b-a4b --dtype bfloat16 --batches 1 8 \
    --learner-batch 0 --out "$OUT/dgemma.md" 2>&1 | tee -a "$log"
  echo "=== summary"; grep "|" "$OUT/dgemma.md"
else
  echo "unknown stage $stage (core | sampler | cache | smoke | families | llada2 | dgemma)"; exit 2
fi
