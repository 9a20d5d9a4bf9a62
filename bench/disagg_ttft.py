"""TTFT overhead of disaggregation: Prefill on a prefill service vs the first token of a colocated
service, over the real gRPC services (the proxy's own overhead is the same for both paths).

Starts ``kvfabric serve prefill``, ``decode`` and ``colocated`` processes itself, sends random
prompts of ``--tokens`` tokens (prefix caching off, so nothing is reused), checks that the
disaggregated continuation equals the colocated tokens, and writes ``disagg_ttft.json``.
``kvfabric bench disagg-ttft --model preset:llama-3.1-8b --dtype bfloat16 --tokens 4096`` on a GPU.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import yaml

from bench.report import environment, save_json
from protos import kvfabric_pb2 as pb
from protos import kvfabric_pb2_grpc as pb_grpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(stub, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stub.Health(pb.HealthRequest(), timeout=2).ok:
                return
        except grpc.RpcError:
            pass
        time.sleep(1)
    raise TimeoutError("a service did not become healthy")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvfabric bench disagg-ttft", description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kv-cache-bytes", type=int, default=4 << 30)
    p.add_argument("--out", default="bench_results/disagg_ttft")
    args = p.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="kvfabric-disagg-ttft-"))
    cfg = {"model": args.model, "dtype": args.dtype,
           "engine": {"kv_cache_bytes": args.kv_cache_bytes, "max_model_len": args.tokens + 64,
                      "max_num_batched_tokens": args.tokens, "enable_prefix_caching": False},
           "kv_transfer_config": {"kv_connector": "zmq"}}
    (workdir / "config.yaml").write_text(yaml.safe_dump(cfg))
    ports = {role: _free_port() for role in ("prefill", "decode", "colocated")}
    procs = [subprocess.Popen([sys.executable, "-m", "kvfabric.cli", "serve", role, "--config",
                               str(workdir / "config.yaml"), "--port", str(port)],
                              stdout=open(workdir / f"{role}.log", "w"), stderr=subprocess.STDOUT)
             for role, port in ports.items()]
    try:
        channels = {r: grpc.insecure_channel(f"127.0.0.1:{port}") for r, port in ports.items()}
        prefill = pb_grpc.PrefillServiceStub(channels["prefill"])
        decode = pb_grpc.DecodeServiceStub(channels["decode"])
        colocated = pb_grpc.DecodeServiceStub(channels["colocated"])
        for stub in (prefill, decode, colocated):
            _wait_healthy(stub, 600)
        vocab = json.loads(colocated.Health(pb.HealthRequest()).stats_json).get("vocab_size", 32000)
        rng = random.Random(0)
        params = pb.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        coloc_ttft, disagg_ttft, equal = [], [], []
        for r in range(args.repeats + 1):
            prompt = [rng.randrange(100, min(vocab, 32000)) for _ in range(args.tokens)]
            t0 = time.perf_counter()
            coloc_tokens, first = [], None
            for chunk in colocated.Generate(pb.GenerateRequest(request_id=f"c{r}", prompt_token_ids=prompt,
                                                               params=params)):
                if first is None and chunk.token_ids:
                    first = time.perf_counter() - t0
                coloc_tokens += chunk.token_ids
            t0 = time.perf_counter()
            pre = prefill.Prefill(pb.PrefillRequest(request_id=f"d{r}", prompt_token_ids=prompt, params=params))
            d_first = time.perf_counter() - t0
            rest = []
            for chunk in decode.Generate(pb.GenerateRequest(
                    request_id=f"d{r}", prompt_token_ids=prompt, params=params,
                    output_token_ids=[pre.first_token_id], kv_transfer_params_json=pre.kv_transfer_params_json)):
                rest += chunk.token_ids
            if r:  # the first round warms up kernels, graphs and connections
                coloc_ttft.append(first)
                disagg_ttft.append(d_first)
                equal.append([pre.first_token_id] + rest == coloc_tokens)
        c, d = statistics.median(coloc_ttft), statistics.median(disagg_ttft)
        report = {"settings": vars(args), "environment": environment(), "ttft_colocated_s": c,
                  "ttft_disaggregated_s": d, "overhead": d / c - 1, "all_colocated_s": coloc_ttft,
                  "all_disaggregated_s": disagg_ttft, "tokens_equal": equal}
        print(f"{args.tokens}-token prompt: TTFT colocated {c * 1e3:.1f} ms, disaggregated {d * 1e3:.1f} ms "
              f"({report['overhead'] * 100:+.1f}%); outputs equal: {all(equal)}")
        save_json(Path(args.out) / "disagg_ttft.json", report)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
