#!/usr/bin/env bash
# One device-machine call: the engine's GPU tests and benchmarks, by section, results under $OUT
# (the device tool's folder) or ./out. Sections (default: tests offline):
#   tests     GPU tests of the kernels, the engine and DCP
#   profile   bench/profile_step.py on the Llama-3.1-8B shape: decode batch 1 and 128, prefill 8k
#   offline   kvfabric bench offline, Llama-3.1-8B shape with HF transformers beside it
#   quick     the same without HF (a faster look while tuning)
#   unfused   the A/B: decode 1/128 and prefill 512/8k with the torch expressions instead of
#             engine/kernels (no HF)
#   qwen      kvfabric bench offline, Qwen3-0.6B shape, no HF
#   dcp       bench/dcp.py, N = 1 vs 2 (needs two GPUs)
# Example: KVFABRIC_COMMIT=abc1234 bash scripts/gpu_check.sh tests profile quick
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
sections=${*:-tests offline}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
L8=(--model preset:llama-3.1-8b --dtype bfloat16 --max-model-len 8448)
for s in $sections; do
  echo "=== $s ($(date +%T))"
  case $s in
    tests)
      python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fused_kernels.py tests/test_triton_attention.py \
        tests/test_gpu_engine.py tests/test_dcp.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    profile)
      python3 -m bench.profile_step --model preset:llama-3.1-8b --batch 1 128 --prefill 8192 \
        2>&1 | grep -v Warning > "$OUT/profile.log"; grep -A12 "median ms per phase\|prefill 8192 (ms" "$OUT/profile.log" ;;
    offline)
      python3 -m kvfabric.cli bench offline "${L8[@]}" --out "$OUT/llama8b" 2>&1 | grep -v Warning | tee "$OUT/bench_llama8b.log" ;;
    quick)
      python3 -m kvfabric.cli bench offline "${L8[@]}" --no-hf --out "$OUT/llama8b" 2>&1 | grep -v Warning | tee "$OUT/bench_llama8b.log" ;;
    unfused)
      python3 -m kvfabric.cli bench offline "${L8[@]}" --no-hf --no-fused-kernels --batches 1,128 --prefill 512,8192 \
        --num-requests 64 --out "$OUT/unfused" 2>&1 | grep -v Warning | tee "$OUT/bench_unfused.log" ;;
    qwen)
      python3 -m kvfabric.cli bench offline --model preset:qwen3-0.6b --dtype bfloat16 --max-model-len 8448 \
        --no-hf --out "$OUT/qwen3" 2>&1 | grep -v Warning | tee "$OUT/bench_qwen3.log" ;;
    dcp)
      python3 -m bench.dcp --model preset:llama-3.1-8b --dcp 1 2 --out "$OUT/dcp" 2>&1 | grep -v Warning | tee "$OUT/dcp.log" | tail -20 ;;
    *) echo "unknown section $s" ;;
  esac
done
echo "=== done ($(date +%T))"
