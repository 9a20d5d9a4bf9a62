#!/usr/bin/env bash
# The CPU measurements quoted in docs/BENCHMARKS.md, in one go (SmolLM2-135M, float32).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_results/cpu}
TRACES=${KVFABRIC_TRACES:-../shared/traces}
mkdir -p "$OUT"
kv=.venv/bin/kvfabric
$kv bench offline --hf-generate --out "$OUT/offline" 2>&1 | grep -v Warning | tee "$OUT/offline.log"
$kv bench tier-ttft --tokens 2048 --connector tiered --out "$OUT/tier_ttft" | tee "$OUT/tier_ttft.log"
$kv bench tier-ttft --tokens 2048 --connector lmcache --out "$OUT/tier_ttft" 2>&1 | grep -E "^lmcache:" | tee -a "$OUT/tier_ttft.log"
$kv bench transfer --connectors zmq --sizes-mb 1,16,256 --out "$OUT/kv_transfer" 2>&1 | tail -3
for mode in disaggregated colocated; do
  flag=""; [ $mode = colocated ] && flag="--colocated"
  $kv up --port 8391 $flag > "$OUT/up_$mode.log" 2>&1 &
  up=$!
  for _ in $(seq 1 120); do grep -q "kvfabric is serving" "$OUT/up_$mode.log" && break; sleep 1; done
  for c in 1 4 16; do
    $kv bench replay --trace "synthetic:n=$((c * 4)),rate=100,input=256,output=32,dist=fixed" \
      --endpoint http://127.0.0.1:8391 --max-concurrency $c --label "$mode-c$c" --no-progress \
      --output "$OUT/replay/$mode-c$c" 2>&1 | tail -1
  done
  # trace file : length scale (prompts of a few hundred tokens for a 2-core CPU) : output name
  for spec in AzureLLMInferenceTrace_conv.csv:0.25:sweep \
              mooncake_conversation_trace_first_half.jsonl:0.03:mooncake-sweep \
              AzureLLMInferenceTrace_code.csv:0.1:azure-code-sweep \
              mooncake_synthetic_trace.jsonl:0.02:mooncake-synthetic-sweep; do
    IFS=: read -r trace scale name <<< "$spec"
    $kv bench replay --trace "$TRACES/$trace" --endpoint http://127.0.0.1:8391 \
      --num-requests 24 --length-scale "$scale" --max-model-len 1024 --sweep 0.5,1,2 --slo ttft=2s,tpot=150ms \
      --label "$mode" --no-progress --output "$OUT/replay/$mode-$name" 2>&1 | tail -1
  done
  kill -INT $up; wait $up
done
$kv bench replay --compare "$OUT"/replay/disaggregated-c*/*.json "$OUT"/replay/colocated-c*/*.json \
  --output "$OUT/replay/compare-concurrency" 2>&1 | tail -1
for trace in sweep mooncake-sweep azure-code-sweep mooncake-synthetic-sweep; do
  $kv bench replay --compare "$OUT/replay/disaggregated-$trace/sweep.json" "$OUT/replay/colocated-$trace/sweep.json" \
    --output "$OUT/replay/compare-$trace" 2>&1 | tail -1
done
