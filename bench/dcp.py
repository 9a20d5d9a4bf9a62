"""Decode context parallelism: decode step time and KV capacity with N = 1 vs N ranks.

For each DCP size (each in its own process; N > 1 starts its workers like a decode server
does) the engine is built at the model's full context with its default KV budget, then for
each (batch, context) a decode-only step — every request one token past ``context`` — is
timed through ``runner.execute``: the whole step (broadcast to the workers, forward, one
all-gather + merge per layer, sampling), with the KV blocks allocated by the engine's own KV
manager so a batch that does not fit is reported as such. N = 1 is timed with CUDA graphs (the
engine's default) and eagerly (DCP runs eagerly), so both comparisons are in the file.

    python -m bench.dcp --model preset:llama-3.1-8b --dcp 1 2 --out DIR    # writes DIR/dcp.json, DIR/dcp.png
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.report import environment, save_json, save_plot


def _build(args, dcp: int):
    from engine import EngineConfig, LLMEngine

    cfg = EngineConfig(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                       max_num_seqs=max(args.batches), enable_prefix_caching=False)
    if dcp == 1:
        return LLMEngine(cfg), None
    from decode_svc.dcp_ranks import launch_dcp_group

    launch = launch_dcp_group(cfg, dcp)
    return LLMEngine(launch.engine_config, dcp_group=launch.group), launch


def _time_step(engine, batch: int, context: int, iters: int, rng: random.Random) -> dict:
    from engine import SamplingParams
    from engine.request import Request
    from engine.scheduler import ScheduledRequest, SchedulerOutput

    kv = engine.kv_cache_manager
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    reqs = []
    try:
        for i in range(batch):
            req = Request(f"b{batch}c{context}-{i}", [rng.randrange(100, vocab - 100) for _ in range(context)], params,
                          max_tokens=16)
            if kv.allocate_slots(req, context) is None:
                return {"fits": False}
            reqs.append(req)
            req.num_computed_tokens = context - 1  # the KV "is there" (zeros): time the last token's step
        out = SchedulerOutput([ScheduledRequest(r, 1, kv.get_block_ids(r.request_id)) for r in reqs])
        times = []
        for i in range(iters + 3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.runner.execute(out)  # returns host token ids: synchronised
            if i >= 3:
                times.append(time.perf_counter() - t0)
        return {"fits": True, "step_ms_median": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times),
                "iters": iters}
    finally:
        for r in reqs:
            kv.free(r)


def run_one(args, dcp: int) -> dict:
    engine, launch = _build(args, dcp)
    try:
        bs = engine.config.block_size
        capacity = (engine.kv_cache_manager.block_pool.num_blocks - 1) * bs * dcp
        rng = random.Random(0)
        variants = {"graphs": True, "eager": False} if engine.runner.graphs is not None else {"eager": False}
        rows = []
        graphs = engine.runner.graphs
        for variant in variants:
            engine.runner.graphs = graphs if variant == "graphs" else None
            for batch in args.batches:
                for context in args.contexts:
                    r = _time_step(engine, batch, context, args.iters, rng)
                    rows.append({"dcp": dcp, "mode": variant, "batch": batch, "context": context, **r})
                    print(json.dumps(rows[-1]), flush=True)
        engine.runner.graphs = graphs
        return {"dcp": dcp, "kv_capacity_tokens_total": capacity, "kv_capacity_tokens_per_rank": capacity // dcp,
                "kv_blocks_per_rank": engine.kv_cache_manager.block_pool.num_blocks - 1, "block_size": bs,
                "max_model_len": engine.max_model_len,
                "max_context_one_request": min(capacity, engine.max_model_len),
                "gpu_mem_allocated_gib_rank0": torch.cuda.memory_allocated() / 2**30, "rows": rows}
    finally:
        engine.shutdown()
        if launch is not None:
            launch.wait()


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in result["runs"]:
        keys = sorted({(r["mode"], r["batch"]) for r in run["rows"]})
        for mode, batch in keys:
            pts = [(r["context"], r["step_ms_median"]) for r in run["rows"]
                   if r["mode"] == mode and r["batch"] == batch and r["fits"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"DCP {run['dcp']} {mode} batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode step (ms, median)")
    ax.set_title(f"{result['model']} {result['dtype']} on {result['environment'].get('device')}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="preset:llama-3.1-8b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dcp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="bench_results/dcp")
    p.add_argument("--single-json", default=None, help=argparse.SUPPRESS)  # one DCP size, written here
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.dcp needs CUDA GPUs (one per DCP rank)")
    if args.single_json:
        save_json(Path(args.single_json), run_one(args, args.dcp[0]))
        return 0
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.dcp:  # a fresh process per size: GPU memory and the process group start clean
            single = Path(tmp) / f"dcp{n}.json"
            cmd = [sys.executable, "-m", "bench.dcp", "--single-json", str(single), "--dcp", str(n),
                   "--model", args.model, "--dtype", args.dtype, "--iters", str(args.iters),
                   "--contexts", *map(str, args.contexts), "--batches", *map(str, args.batches)]
            if args.max_model_len:
                cmd += ["--max-model-len", str(args.max_model_len)]
            subprocess.run(cmd, check=True)
            runs.append(json.loads(single.read_text()))
    base = runs[0]["kv_capacity_tokens_total"]
    result = {"benchmark": "dcp", "model": args.model, "dtype": args.dtype,
              "environment": environment(torch.device("cuda", 0)), "gpus": torch.cuda.device_count(),
              "command": "python -m bench.dcp " + " ".join(argv if argv is not None else sys.argv[1:]),
              "kv_capacity_gain": {r["dcp"]: r["kv_capacity_tokens_total"] / base for r in runs}, "runs": runs}
    out = Path(args.out)
    save_json(out / "dcp.json", result)
    _plot(result, out / "dcp.png")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
