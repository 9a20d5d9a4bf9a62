"""Where one engine step's host time goes: each phase timed with CUDA syncs, plus torch.profiler.

``python -m bench.profile_step --model preset:llama-3.1-8b --batch 1 128 --prefill 8192`` (GPU).
A diagnostic, not a benchmark: it syncs between phases, so its total exceeds a normal step's.
Kernel tables are sorted by device time; a decode step replays a CUDA graph, so its table shows
the kernels inside the replay where the profiler can see them, and the eager forward's otherwise.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="preset:qwen3-0.6b")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--no-fused", action="store_true", help="torch expressions instead of engine/kernels")
    args = p.parse_args(argv)

    from engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(
        model=args.model, dtype="bfloat16", max_model_len=max(4096, args.prefill + 64, args.context + 128),
        max_num_seqs=max(max(args.batch), 8), max_num_batched_tokens=max(2048, args.prefill),
        gpu_memory_utilization=0.5, fused_kernels=not args.no_fused))
    sync = torch.cuda.synchronize
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            sync()
            t0 = time.perf_counter()
            r = fn(*a, **k)
            sync()
            times.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
            return r
        return wrapper

    runner = engine.runner
    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.scheduler.update_from_output = timed("update_from_output", engine.scheduler.update_from_output)
    runner.build_metadata = timed("build_metadata", runner.build_metadata)
    if runner.graphs is not None:
        runner.graphs.run = timed("graph_replay", runner.graphs.run)
    runner.model.compute_logits = timed("compute_logits", runner.model.compute_logits)
    runner.sampler.__class__.__call__ = timed("sampler", runner.sampler.__class__.__call__)
    runner.execute = timed("execute_total", runner.execute)
    engine.step = timed("step_total", engine.step)

    for batch in args.batch:
        _decode(engine, batch, args.context, times)
    from torch.profiler import ProfilerActivity, profile

    times.clear()
    for i in range(2):  # the first prefill warms up SDPA / Triton autotuning
        times.clear()
        engine.add_request(f"p{i}", list(range(1000 + i, 1000 + i + args.prefill)), SamplingParams(max_tokens=1))
        while engine.has_work():
            engine.step()
    print(f"prefill {args.prefill} (ms per phase, synced):", {k: round(v[0], 3) for k, v in times.items()})
    engine.add_request("p", list(range(5000, 5000 + args.prefill)), SamplingParams(max_tokens=1))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        while engine.has_work():
            engine.step()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25))
    return 0


def _decode(engine, batch: int, context: int, times: dict) -> None:
    from torch.profiler import ProfilerActivity, profile

    from engine import SamplingParams

    for i in range(batch):
        engine.add_request(f"d{batch}-{i}", list(range(100 + i, 100 + i + context)),
                           SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
        engine.step()
    times.clear()
    for _ in range(30):
        engine.step()
    print(f"decode batch {batch}, context {context} (median ms per phase, synced):")
    for name, v in times.items():
        v = sorted(v)
        print(f"  {name:20s} {v[len(v) // 2]:8.3f}")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=20))
    engine.abort_request(list(engine.scheduler.requests))
    while engine.has_work():
        engine.step()


if __name__ == "__main__":
    raise SystemExit(main())
