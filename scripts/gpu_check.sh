#!/usr/bin/env bash
# One device-machine session: GPU tests, then the offline benchmark on the Llama-3.1-8B and
# Qwen3-0.6B shapes (random bf16 weights). Results under $OUT (the device tool's folder) or ./out.
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_engine.py tests/test_triton_attention.py \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -15
python3 -m kvfabric.cli bench offline --model preset:llama-3.1-8b --dtype bfloat16 --max-model-len 8448 \
  --out "$OUT/llama8b" 2>&1 | grep -v Warning | tee "$OUT/bench_llama8b.log"
python3 -m kvfabric.cli bench offline --model preset:qwen3-0.6b --dtype bfloat16 --max-model-len 8448 \
  --no-hf --out "$OUT/qwen3" 2>&1 | grep -v Warning | tee "$OUT/bench_qwen3.log"
