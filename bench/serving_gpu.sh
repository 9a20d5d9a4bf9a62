#!/usr/bin/env bash
# The GPU serving benchmark of issue #17: `kvfabric up` on the Llama-3.1-8B shape (random bf16
# weights, bundled SmolLM2 tokenizer: preset:llama-3.1-8b), --num-kv-blocks 12000
# --max-num-seqs 128 --max-model-len 8448, colocated against disaggregated per connector (one fresh
# `up` per mode), replaying 100 requests of the Mooncake conversation trace (first half,
# --length-scale 0.5, clipped to 8,192 tokens) at Poisson 2/4/8 req/s, SLO TTFT <= 1 s,
# TPOT <= 50 ms. Driver: bench/serving_gpu.py (every flag passes through). Writes into $OUT
# (default out/serving_gpu): serving_gpu.json, serving_gpu.md, serving_gpu.png, serving_gpu.log
# and serving_gpu_work.tar.gz (every replay report and each `up`'s log).
#
#   bash bench/serving_gpu.sh [--wheels DIR] [bench/serving_gpu.py flags: --modes colocated,auto,zmq,ipc
#                             --rates 2,4,8 --num-requests 100 --trace FILE ...]
#
# Time: a mode takes its start (~1 min) plus ~50 + 25 + 13 s of arrivals and the drain; run the
# modes over two device calls of 10 minutes (colocated,auto then zmq,ipc), or fewer requests.
#
# The device machine lacks some of kvfabric's Python packages; carry them as wheels (python 3.12,
# manylinux), downloaded here into .whl/ (ignored) with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0 pydantic==2.14.4 pydantic-core==2.50.5 \
#     annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 pyzmq==27.3.0 \
#     opentelemetry-api==1.45.3 sniffio==1.3.1
# and the trace into .traces/ (ignored too: `echo /.traces/ >> .git/info/exclude`):
#   mkdir -p .traces && cp ../shared/traces/mooncake_conversation_trace_first_half.jsonl .traces/
# Device command (carry [".whl", ".traces"]):
#   bash bench/serving_gpu.sh --wheels .whl --trace .traces/mooncake_conversation_trace_first_half.jsonl \
#     --modes colocated,auto
# A CPU dry run (a few seconds of load, the tiny preset):
#   PYTHON=.venv/bin/python OUT=/tmp/sg bash bench/serving_gpu.sh --device cpu --model preset:tiny-llama \
#     --modes colocated,zmq,zmq+adaptive --rates 2,4 --num-requests 6 --length-scale 0.02 --clip-tokens 400 \
#     --max-model-len 512 --num-kv-blocks 600 --max-num-seqs 16 --warmup 1 --trace ../shared/traces/...
set -uo pipefail
OUT=${OUT:-out/serving_gpu}
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/serving_gpu_work}
if [ "${1:-}" = "--wheels" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$2"/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
  shift 2
fi
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT"
rm -rf "$WORK"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
"$PY" -m bench.serving_gpu --out "$OUT" --work "$WORK" "$@" 2>&1 | tee "$OUT/serving_gpu.log"
status=${PIPESTATUS[0]}
tar czf "$OUT/serving_gpu_work.tar.gz" -C "$(dirname "$WORK")" "$(basename "$WORK")" 2>/dev/null
exit "$status"
