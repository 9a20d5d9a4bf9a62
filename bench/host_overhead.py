"""Host time of a decode step, the model's forward left out: what the engine's Python costs per step.

On a GPU this time does not overlap the device (each step waits for its tokens), so it adds to
every decode step; it is measured here on any machine with a tiny random model, whose forward is
cheap and is subtracted anyway. Streaming (an output object per request per step) and
``stream=False`` (one output when a request finishes) are timed alternately, twice each.

    python -m bench.host_overhead --batch 128 --out DIR    # writes DIR/host_overhead.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from bench.report import environment, save_json


def host_ms_per_step(engine, batch: int, stream: bool, steps: int, tag: str) -> float:
    from engine import SamplingParams

    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 60, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{tag}-{i}", [rng.randrange(100, 400) for _ in range(64)], params, stream=stream)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.requests.values()):
        engine.step()
    for _ in range(20):
        engine.step()
    model = engine.runner.model
    forward, forward_s = model.forward, []

    def timed_forward(*a, **k):
        t0 = time.perf_counter()
        out = forward(*a, **k)
        forward_s.append(time.perf_counter() - t0)
        return out

    model.forward = timed_forward
    step_s = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            engine.step()
            step_s.append(time.perf_counter() - t0)
    finally:
        del model.forward  # back to the class's method
    engine.abort_request(list(engine.scheduler.requests))
    while engine.has_work():
        engine.step()
    return statistics.median(s - f for s, f in zip(step_s, forward_s)) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host_overhead", description=__doc__)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default="bench_results/host_overhead")
    args = p.parse_args(argv)

    from engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model="preset:tiny-llama", dtype="float32", device="cpu",
                                    max_num_seqs=args.batch, kv_cache_bytes=1 << 30))
    rows = []
    for i, stream in enumerate((True, False, True, False)):
        ms = host_ms_per_step(engine, args.batch, stream, args.steps, f"r{i}")
        rows.append({"stream": stream, "host_ms_per_step": ms})
        print(f"batch {args.batch}, stream={stream}: {ms:.3f} ms of host time per decode step")
    engine.shutdown()
    save_json(Path(args.out) / "host_overhead.json",
              {"benchmark": "host_overhead", "environment": environment(), "batch": args.batch, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
