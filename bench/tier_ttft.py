"""TTFT of a repeated long prompt: recomputed vs loaded from a KV connector's store.

The engine's own prefix cache is off, so the second request's prefix can only come from the
connector (``tiered``: CPU RAM → disk; ``lmcache``: LMCache's engine over its local CPU backend,
``--chunk-size`` tokens per LMCache chunk). TTFT here is the wall time from ``add_request`` to the
first token out of ``step()``, median of repeats.
``kvfabric bench tier-ttft --model preset:llama-3.1-8b --dtype bfloat16 --tokens 8192`` on a GPU;
``kvfabric bench tier-ttft --tokens 2048`` on CPU (bundled SmolLM2). Writes
``tier_ttft_<label>.json`` (label: the connector, plus the chunk size for lmcache);
``--compare A.json B.json ...`` draws their recompute and loaded TTFTs side by side (PNG).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from bench.report import environment, save_json, save_plot


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


def _connector_extra(args: argparse.Namespace) -> dict:
    if args.connector == "tiered":
        return {"cpu": {"capacity_bytes": args.cpu_bytes}}
    # LMCache counts its local CPU size in GB; the same budget as the tiered run's CPU tier.
    from storage_tiers.hierarchy import parse_bytes

    return {"chunk_size": args.chunk_size, "local_cpu": True, "max_local_cpu_size": parse_bytes(args.cpu_bytes) / 2**30}


def measure(args: argparse.Namespace) -> dict:
    from engine import EngineConfig, LLMEngine
    from kv_connector import KVTransferConfig, create_connector

    conn = create_connector(KVTransferConfig(kv_connector=args.connector, kv_role="kv_both",
                                             kv_connector_extra_config=_connector_extra(args)))
    cfg = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, enable_prefix_caching=False,
                       max_num_batched_tokens=max(args.tokens, 2048), max_model_len=args.tokens + 64,
                       gpu_memory_utilization=0.8)
    engine = LLMEngine(cfg, kv_connector=conn)
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    recompute, loaded = [], []
    try:
        for r in range(args.repeats + 1):
            prompt = [rng.randrange(100, vocab - 100) for _ in range(args.tokens)]
            cold = _ttft(engine, f"cold{r}", prompt)  # computes, then saves its blocks at finish
            warm = _ttft(engine, f"warm{r}", prompt)  # the same prompt: its blocks come from the store
            if r:  # the first pair warms up kernels and allocators
                recompute.append(cold)
                loaded.append(warm)
        stats = engine.stats()
    finally:
        engine.shutdown()
    return {"settings": vars(args), "environment": environment(engine.device),
            "model": engine.model_config.describe(), "label": label(args),
            "ttft_recompute_s": statistics.median(recompute), "ttft_loaded_s": statistics.median(loaded),
            "speedup": statistics.median(recompute) / statistics.median(loaded),
            "all_recompute_s": recompute, "all_loaded_s": loaded, "connector_stats": stats.get("connector")}


def label(args: argparse.Namespace) -> str:
    return args.connector if args.connector == "tiered" else f"lmcache-chunk{args.chunk_size}"


def plot_compare(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["recompute"] + [r["label"].replace("-", "\n") for r in reports]
    # One recompute bar: the runs differ only in the connector, so their recomputes measure the same thing.
    values = [statistics.median(r["ttft_recompute_s"] for r in reports)] + [r["ttft_loaded_s"] for r in reports]
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar(names, [v * 1e3 for v in values], color=["#999999"] + ["#3b75af"] * len(reports))
    ax.bar_label(bars, fmt="%.1f")
    r0 = reports[0]
    ax.set_ylabel("TTFT (ms), median")
    ax.set_title(f"{r0['settings']['tokens']}-token repeated prompt, {r0['model'].get('model_id', '')}\n"
                 f"{r0['environment']['device']}", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kvfabric bench tier-ttft", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--connector", default="tiered", choices=["tiered", "lmcache"])
    p.add_argument("--chunk-size", type=int, default=16, help="lmcache: tokens per LMCache chunk (k x block_size)")
    p.add_argument("--cpu-bytes", default="8GiB", help="the store's CPU budget (either connector)")
    p.add_argument("--out", default="bench_results/tier_ttft")
    p.add_argument("--compare", nargs="+", metavar="JSON", help="plot these results together instead of measuring")
    args = p.parse_args(argv)

    if args.compare:
        reports = [json.loads(Path(f).read_text()) for f in args.compare]
        for r in reports:
            r.setdefault("label", r["settings"]["connector"])
        plot_compare(reports, Path(args.out) / "tier_ttft_compare.png")
        return 0
    report = measure(args)
    print(f"{report['label']}: {args.tokens}-token prompt TTFT recompute {report['ttft_recompute_s'] * 1e3:.1f} ms, "
          f"loaded {report['ttft_loaded_s'] * 1e3:.1f} ms ({report['speedup']:.1f}x)", flush=True)
    save_json(Path(args.out) / f"tier_ttft_{report['label']}.json", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
