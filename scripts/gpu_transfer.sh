#!/usr/bin/env bash
# One device-machine run for one KV transport (issue 6): its tests (GPU and CPU), then the transfer
# benchmarks — one process; two processes through host memory on one GPU; two processes on one
# GPU (CUDA IPC); two processes GPU 0 → GPU 1 where there are two GPUs; for ipc also its ring on
# those placements and bench/ipc_copy.py.
#
#   bash scripts/gpu_transfer.sh ucx     # needs .whl/ucx  (pyzmq, ucxx-cu13, libucxx-cu13, libucx-cu13)
#   bash scripts/gpu_transfer.sh nixl    # needs .whl/nixl (pyzmq, nixl-cu13)
#   bash scripts/gpu_transfer.sh ipc     # needs .whlz     (pyzmq); also bench/ipc_copy.py, bench/block_copy.py
#
# The NIXL wheel and the UCX wheels do not fit one device upload together, hence one run each.
# Everything lands under $OUT (./out by default): transfer_<T>.log, <T>_*.json, <T>.png.
# The last thing printed is a summary table.
set -uo pipefail
T=${1:-}
case "$T" in ucx|nixl) WHEELS=.whl/$T ;; ipc) WHEELS=.whlz ;; *) echo "usage: $0 ucx|nixl|ipc" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/transfer_$T.log") 2>&1
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
nvidia-smi topo -m
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
python3 -c "import torch, zmq; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'pyzmq', zmq.__version__)"
if [ "$T" = ucx ]; then
  python3 -c "from kv_connector.ucx_connector import ucx_api; ucx_api(); import ucxx; print('ucxx', ucxx.__version__)"
elif [ "$T" = nixl ]; then
  python3 -c "from kv_connector.nixl_connector import nixl_api; print('nixl', nixl_api()[0].__module__)"
fi

echo "== tests: $T (GPU round trips, CPU behaviour, producer killed mid-transfer)"
timeout 240 python3 -m pytest -q -p no:cacheprovider -o faulthandler_timeout=45 tests/test_kv_connector.py tests/test_transport_failures.py \
  $([ "$T" = ipc ] && echo tests/test_ipc_connector.py tests/test_block_copy.py) \
  -k "($T or block_copy) and not kvfabric_up" 2>&1 | tail -25

[ "$T" != ipc ] && echo "== which UCX protocols a GPU round trip of $T takes (UCX_PROTO_INFO)" &&
UCX_PROTO_INFO=y timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_kv_connector.py \
  -k "device_caches_round_trip and $T" 2>&1 \
  | grep -E "cuda_ipc|cuda_copy|tcp/|cma/|sysv/|posix/|remote memory|ucp_get|ucp_put|tag_send" \
  | sed -E 's/^\[[^]]*\] +\[[^]]*\] +//' | awk '!seen[$0]++' | head -60

bench() {  # NAME BUDGET_S ARGS...
  local name=$1 budget=$2; shift 2
  echo "== bench $name"
  timeout $((budget + 120)) python3 -m bench.kv_transfer --device cuda --sizes-mb 0.0625,1,16,64,256,1024 \
    --repeats 3 --max-seconds-per-point 1.5 --time-budget-s "$budget" --out "$OUT" --name "$name" --no-plot "$@" \
    2>&1 | grep --line-buffered -v -E "NIXL INFO|UCX +WARN"
}
if [ "$T" = ucx ]; then ONE=zmq,inproc,ucx; else ONE=$T; fi
[ "$T" != ipc ] && bench "${T}_1proc" 70 --connectors "$ONE"  # one process: ipc falls back to its ring
bench "${T}_2proc_host" 55 --connectors "$T" --processes 2 --producer-memory host --producer-gpu 0 --consumer-gpu 0
bench "${T}_2proc_gpu0" 35 --connectors "$T" --processes 2 --producer-gpu 0 --consumer-gpu 0
if [ "$T" = ipc ]; then  # the ring where the runs above read the peer's memory in place
  bench "${T}_2proc_gpu0_via_host" 45 --connectors "$T" --processes 2 --producer-gpu 0 --consumer-gpu 0 --through-host
  bench "${T}_2proc_host_ring" 45 --connectors "$T" --processes 2 --producer-memory host --producer-gpu 0 \
    --consumer-gpu 0 --extra '{"share_host_cache": false}'
  for C in $(seq 0 $((${NGPU:-1} - 1))); do  # a copy out of a CUDA IPC mapping vs from local memory
    timeout 60 python3 -m bench.ipc_copy --mb 1024 --consumer-gpu "$C" --out "$OUT/ipc_copy" 2>&1 | tail -1
  done
  echo "== bench block_copy (DMA vs kernel for scattered blocks, GB/s)"
  timeout 150 python3 -m bench.block_copy --sizes-mb 64,1024 --out "$OUT/block_copy" 2>&1 | tail -6
fi
if [ "${NGPU:-0}" -ge 2 ]; then
  bench "${T}_2proc_gpu0to1" 55 --connectors "$T" --processes 2 --producer-gpu 0 --consumer-gpu 1
else
  echo "== one GPU: no GPU 0 → GPU 1 run"
fi

python3 -m bench.kv_transfer --plot-from "$OUT"/"$T"_*.json --out "$OUT" --name "$T"
echo "== summary ($T): GB/s, start_load_kv → finished, median of 3 after a first pull that connects"
python3 -m bench.kv_transfer --summary "$OUT"/"$T"_*.json
