"""Where one engine step's host time goes: each phase timed with CUDA syncs, plus torch.profiler.

``python -m bench.profile_step --model preset:qwen3-0.6b`` (GPU). A diagnostic, not a benchmark:
it syncs between phases, so its total exceeds a normal step's.
"""

from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="preset:qwen3-0.6b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--prefill", type=int, default=512)
    args = p.parse_args(argv)

    from engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model=args.model, dtype="bfloat16", max_model_len=4096,
                                    max_num_seqs=max(args.batch, 8), gpu_memory_utilization=0.5))
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

    for i in range(args.batch):
        engine.add_request(f"d{i}", list(range(100, 100 + args.context)),
                           SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
        engine.step()
    times.clear()
    for _ in range(30):
        engine.step()
    print(f"decode batch {args.batch}, context {args.context} (median ms per phase, synced):")
    for name, v in times.items():
        v = sorted(v)
        print(f"  {name:20s} {v[len(v) // 2]:8.3f}")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    engine.abort_request(list(engine.scheduler.requests))
    while engine.has_work():
        engine.step()

    times.clear()
    engine.add_request("p", list(range(200, 200 + args.prefill)), SamplingParams(max_tokens=1))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        while engine.has_work():
            engine.step()
    print(f"prefill {args.prefill} (ms per phase):", {k: round(v[0], 3) for k, v in times.items()})
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
