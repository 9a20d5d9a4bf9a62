"""What a copy out of a peer process's CUDA IPC mapping costs, next to the same copy from local memory.

A child process allocates ``--mb`` on GPU ``--producer-gpu`` and exports it (``kv_connector/cuda_ipc``);
this process maps it on GPU ``--consumer-gpu`` and times, best of 5, copying all of it into a local
buffer: ``memcpy`` (``copy_``, i.e. cudaMemcpyAsync) and a gather kernel (``index_select`` of 2 MiB
rows straight into the destination, what ``ipc_connector.copy_rows`` does for scattered blocks), each
from the mapping and from a local source. Writes JSON.

    python -m bench.ipc_copy --mb 1024 --out DIR
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.report import environment, save_json

_CHILD = """
import json, sys, time, torch
from kv_connector import cuda_ipc
t = torch.full((int(sys.argv[1]),), 7, dtype=torch.uint8, device=f"cuda:{sys.argv[2]}")
torch.cuda.synchronize()
print(json.dumps(cuda_ipc.export(t)), flush=True)
sys.stdin.read()
"""


def _best_gbps(fn, nbytes: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return nbytes / min(times) / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ipc_copy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=1024)
    p.add_argument("--producer-gpu", type=int, default=0)
    p.add_argument("--consumer-gpu", type=int, default=0)
    p.add_argument("--out", default="bench_results/ipc_copy")
    args = p.parse_args(argv)
    from kv_connector import cuda_ipc

    nbytes, row = args.mb << 20, 2 << 20
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(nbytes), str(args.producer_gpu)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        dev = torch.device("cuda", args.consumer_gpu)
        torch.cuda.set_device(dev)
        m = cuda_ipc.Mapping(json.loads(child.stdout.readline()), dev)
        remote = m.buf
        local_src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        idx = torch.arange(nbytes // row, device=remote.device)

        def gather(src):
            rows = src.view(torch.int64).view(-1, row // 8)
            out = dst.view(torch.int64).view(-1, row // 8)
            i = idx.to(src.device)
            return lambda: torch.index_select(rows, 0, i, out=out)

        res = {"memcpy_from_ipc": _best_gbps(lambda: dst.copy_(remote), nbytes),
               "memcpy_local": _best_gbps(lambda: dst.copy_(local_src), nbytes)}
        if remote.device == dev:
            res["gather_kernel_from_ipc"] = _best_gbps(gather(remote), nbytes)
        res["gather_kernel_local"] = _best_gbps(gather(local_src), nbytes)
        dst.copy_(remote)
        ok = bool((dst == 7).all())
        m.close()
    finally:
        child.stdin.close()
        child.wait()
    data = {"benchmark": "ipc_copy", "env": environment(dev), "bytes": nbytes, "producer_gpu": args.producer_gpu,
            "consumer_gpu": args.consumer_gpu, "mapped_device": str(remote.device), "bytes_equal": ok,
            "gb_per_s": res}
    print(json.dumps(data["gb_per_s"]), "mapped on", data["mapped_device"], "intact", ok)
    save_json(Path(args.out) / f"ipc_copy_gpu{args.producer_gpu}_to_gpu{args.consumer_gpu}.json", data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
