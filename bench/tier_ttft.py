"""TTFT of a repeated long prompt: recomputed vs loaded from a KV connector's store.

The engine's own prefix cache is off, so the second request's prefix can only come from the
connector (``tiered``: CPU RAM → disk; ``lmcache``: LMCache's engine). TTFT here is the wall time
from ``add_request`` to the first token out of ``step()``, median of repeats.
``kvfabric bench tier-ttft --model preset:llama-3.1-8b --tokens 8192`` on a GPU;
``kvfabric bench tier-ttft --tokens 2048`` on CPU (bundled SmolLM2). Writes ``tier_ttft.json``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from bench.report import environment, save_json


def _ttft(engine, rid: str, prompt: list[int]) -> float:
    """Seconds until the first token comes out; the request then runs on to its finish (where
    the connector saves its blocks) outside the timed part."""
    from engine import SamplingParams

    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.add_request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    ttft = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if ttft is None and out.new_token_ids:
                ttft = time.perf_counter() - t0  # token ids are on the host: the step has synced
    return ttft


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvfabric bench tier-ttft", description=__doc__)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--connector", default="tiered", choices=["tiered", "lmcache"])
    p.add_argument("--cpu-bytes", default="8GiB")
    p.add_argument("--out", default="bench_results/tier_ttft")
    args = p.parse_args(argv)

    from engine import EngineConfig, LLMEngine
    from kv_connector import KVTransferConfig, create_connector

    extra = {"cpu": {"capacity_bytes": args.cpu_bytes}} if args.connector == "tiered" else \
        {"chunk_size": 16, "local_cpu": True, "max_local_cpu_size": 8.0}
    conn = create_connector(KVTransferConfig(kv_connector=args.connector, kv_role="kv_both",
                                             kv_connector_extra_config=extra))
    cfg = EngineConfig(model=args.model, dtype=args.dtype, enable_prefix_caching=False,
                       max_num_batched_tokens=max(args.tokens, 2048), max_model_len=args.tokens + 64,
                       gpu_memory_utilization=0.8)
    engine = LLMEngine(cfg, kv_connector=conn)
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    recompute, loaded = [], []
    for r in range(args.repeats + 1):
        prompt = [rng.randrange(100, vocab - 100) for _ in range(args.tokens)]
        cold = _ttft(engine, f"cold{r}", prompt)  # computes, then saves its blocks at finish
        warm = _ttft(engine, f"warm{r}", prompt)  # the same prompt: its blocks come from the store
        if r:  # the first pair warms up kernels and allocators
            recompute.append(cold)
            loaded.append(warm)
    stats = engine.stats()
    engine.shutdown()
    report = {"settings": vars(args), "environment": environment(engine.device), "model": engine.model_config.describe(),
              "ttft_recompute_s": statistics.median(recompute), "ttft_loaded_s": statistics.median(loaded),
              "speedup": statistics.median(recompute) / statistics.median(loaded),
              "all_recompute_s": recompute, "all_loaded_s": loaded, "connector_stats": stats.get("connector")}
    print(f"{args.connector}: {args.tokens}-token prompt TTFT recompute {report['ttft_recompute_s'] * 1e3:.1f} ms, "
          f"loaded {report['ttft_loaded_s'] * 1e3:.1f} ms ({report['speedup']:.1f}x)")
    save_json(Path(args.out) / f"tier_ttft_{args.connector}.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
