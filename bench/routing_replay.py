"""Routing policies compared on a trace: one fresh ``kvfabric up`` per policy, the same replay.

    python -m bench.routing_replay --policies prefix,least_load --num-requests 400 \\
        --length-scale 0.015625 --time-scale 0.05 --output bench_results/routing

For each policy: start 2 prefill + 2 decode instances (``--prefill``/``--decode``) with KV events
on, wait for the ready line, run ``bench.replay`` against the proxy, read the engines' prefix-cache
counters from the proxy's /metrics, stop everything. The policies run back to back in one
invocation, so they see the same machine (and the same neighbours on a shared one). Writes
``routing.json`` (per policy: hit rate, TTFT, TPOT, goodput, routing decisions), ``routing.md``,
``routing.png``, and each policy's replay report under ``<policy>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from bench.report import environment
from kvfabric.up_cmd import free_port


def start_fabric(policy: str, args, work: Path) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    cfg = {"dtype": args.dtype,
           "engine": {"max_model_len": args.max_model_len, "kv_cache_bytes": args.kv_cache_mb << 20,
                      "max_num_batched_tokens": 1024, "block_size": args.block_size},
           "proxy": {"port": port, "health_interval_s": 0.5, "routing_policy": policy,
                     "prefix_weight": args.prefix_weight, "load_weight": args.load_weight},
           "prefill": {"instances": args.prefill}, "decode": {"instances": args.decode},
           "kv_transfer_config": {"kv_connector": "zmq"},
           "kv_events_config": {"enable_kv_cache_events": True}}
    path = work / f"{policy}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = work / f"{policy}.log"
    proc = subprocess.Popen([sys.executable, "-m", "kvfabric.cli", "up", "--config", str(path)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 600
    while "kvfabric is serving at" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"kvfabric up ({policy}) did not start:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    return proc, f"http://127.0.0.1:{port}", log


def scrape(url: str) -> dict[str, float]:
    """Sum each metric family of interest over its label sets, per role where it has one."""
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r'^(kvfabric_prefix_cache_(?:hits|queries)|kvfabric_routing_decisions_total)\{(.*)\} (\S+)$', line)
        if not m:
            continue
        name, labels, value = m.groups()
        lab = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        key = f"{name}:{lab.get('role')}" + (f":{lab['reason']}" if "reason" in lab else "")
        out[key] = out.get(key, 0.0) + float(value)
    return out


def run_policy(policy: str, args, work: Path, out_dir: Path) -> dict:
    proc, url, log = start_fabric(policy, args, work)
    try:
        before = scrape(url)
        replay = [sys.executable, "-m", "bench.replay", "--trace", args.trace, "--endpoint", url,
                  "--num-requests", str(args.num_requests), "--start", str(args.start),
                  "--length-scale", str(args.length_scale), "--time-scale", str(args.time_scale),
                  "--max-model-len", str(args.max_model_len), "--slo", args.slo, "--label", policy,
                  "--warmup", "0", "--no-progress", "--output", str(out_dir / policy)]
        if args.max_concurrency:
            replay += ["--max-concurrency", str(args.max_concurrency)]
        subprocess.run(replay, check=True)
        after = scrape(url)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    report = json.loads((out_dir / policy / "replay.json").read_text())
    m = report["metrics"]
    hits, queries = delta.get("kvfabric_prefix_cache_hits:prefill", 0.0), delta.get("kvfabric_prefix_cache_queries:prefill", 0.0)
    return {"policy": policy, "prefill_cache_hit_rate": hits / queries if queries else 0.0,
            "prefill_cache_hit_tokens": hits, "prefill_cache_query_tokens": queries,
            "ttft_s": {k: m["ttft"][k] for k in ("mean", "p50", "p90", "p99")},
            "tpot_s": {k: m["tpot"][k] for k in ("mean", "p50", "p90", "p99")},
            "goodput_rps": m["goodput"], "slo_attainment": m["slo_attainment"],
            "errors": m["errors"], "completed": m["completed"],
            "routing_decisions": {k: v for k, v in delta.items() if k.startswith("kvfabric_routing")}}


def multi_turn_trace(trace: str, start: int, window: int, dest: Path) -> Path:
    """The requests of ``trace[start:start + window]`` whose conversation has another turn there.

    A conversation is named by its first two hash blocks (the first is the system prompt every
    request shares). In any stretch of the Mooncake conversation trace only ~10 % of the requests
    continue a conversation of the same stretch, so a prefix-aware router can change the latency
    of few of them; this keeps the multi-turn ones, in trace order with their own timestamps, which
    is the workload cache-aware routing exists for.
    """
    records = [json.loads(line) for line in Path(trace).read_text().splitlines() if line.strip()]
    records = records[start:start + window]
    turns: dict[tuple, int] = {}
    for r in records:
        turns[tuple(r["hash_ids"][:2])] = turns.get(tuple(r["hash_ids"][:2]), 0) + 1
    kept = [r for r in records if len(r["hash_ids"]) > 1 and turns[tuple(r["hash_ids"][:2])] > 1]
    dest.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return dest


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["policy"] for r in results]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    panels = [("prefill prefix-cache hit rate", [r["prefill_cache_hit_rate"] for r in results]),
              ("TTFT p50 (s)", [r["ttft_s"]["p50"] for r in results]),
              ("TTFT p90 (s)", [r["ttft_s"]["p90"] for r in results]),
              ("goodput (req/s)", [r["goodput_rps"] for r in results])]
    for ax, (title, values) in zip(axes, panels):
        ax.bar(names, values, color=["tab:green" if n == "prefix" else "tab:gray" for n in names])
        ax.set_title(title)
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom")
    fig.suptitle("routing policy on the Mooncake conversation trace, 2 prefill + 2 decode (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", default="prefix,least_load")
    p.add_argument("--trace", default="/work/shared/traces/mooncake_conversation_trace_first_half.jsonl")
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--num-requests", type=int, default=400)
    p.add_argument("--length-scale", type=float, default=1 / 64)
    p.add_argument("--time-scale", type=float, default=0.05)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--kv-cache-mb", type=int, default=256)
    p.add_argument("--block-size", type=int, default=8, help="engine block size; 8 = the trace's 512-token "
                   "blocks at --length-scale 1/64, so a shared trace block is a shared engine block")
    p.add_argument("--prefill", type=int, default=2)
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--dtype", default="float32", help="float32 on CPU; bfloat16 on a GPU")
    p.add_argument("--prefix-weight", type=float, default=2.0)
    p.add_argument("--load-weight", type=float, default=1.0)
    p.add_argument("--slo", default="ttft=5s,tpot=500ms")
    p.add_argument("--output", default="bench_results/routing")
    p.add_argument("--multi-turn-window", type=int, default=0,
                   help="replay only the multi-turn conversations of this many trace requests from --start "
                        "(0: the trace as it is)")
    args = p.parse_args(argv)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.multi_turn_window:
        args.trace = str(multi_turn_trace(args.trace, args.start, args.multi_turn_window,
                                          out_dir / "multi_turn_trace.jsonl"))
        args.start = 0
    env = environment()  # now: the commit the runs use, not whatever HEAD is when they end
    results = []
    with tempfile.TemporaryDirectory(prefix="kvfabric-routing-") as work:
        for policy in args.policies.split(","):
            results.append(run_policy(policy, args, Path(work), out_dir))
            print(json.dumps(results[-1]), flush=True)
    doc = {"kind": "kvfabric.bench.routing", "settings": vars(args), "environment": env,
           "results": results}
    (out_dir / "routing.json").write_text(json.dumps(doc, indent=2))
    rows = ["| policy | prefill hit rate | TTFT p50 | TTFT p90 | TPOT p50 | goodput (req/s) | errors |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    rows += [f"| {r['policy']} | {r['prefill_cache_hit_rate']:.1%} | {r['ttft_s']['p50']:.3f} s | "
             f"{r['ttft_s']['p90']:.3f} s | {r['tpot_s']['p50'] * 1000:.1f} ms | {r['goodput_rps']:.3f} | "
             f"{sum(r['errors'].values())} |" for r in results]
    (out_dir / "routing.md").write_text("\n".join(rows) + "\n")
    plot(results, out_dir / "routing.png")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
