"""``kvfabric bench replay``: replay a request trace against an OpenAI-compatible endpoint.

    kvfabric bench replay --trace mooncake_conversation_trace_first_half.jsonl \\
        --endpoint http://127.0.0.1:8000 --num-requests 200 --length-scale 0.0625 --time-scale 2 \\
        --slo ttft=2s,tpot=100ms --output out/replay
    kvfabric bench replay --trace synthetic:n=300,rate=4,groups=8 --endpoint URL --sweep 1,2,4,8 --output DIR
    kvfabric bench replay --compare colocated/replay.json disagg/replay.json --output out/compare

Writes ``replay.json``, ``replay.md`` and PNGs into ``--output`` (for ``--sweep``: JSON and
markdown per rate under ``rate_R/``, plus ``sweep.json``, ``sweep.md`` and PNGs of all rates).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
from pathlib import Path

import numpy as np

from bench.replay import prompts as replay_prompts
from bench.replay.client import ClientConfig, get_json
from bench.replay.metrics import parse_slo
from bench.replay.report import sweep_report, write_comparison, write_run, write_sweep
from bench.replay.runner import RunPlan, run_replay
from bench.replay.traces import load_trace


def _rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sweep wants comma-separated req/s values, not {text!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("--sweep rates must be positive")
    return rates


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", help="Mooncake .jsonl, Azure .csv, or synthetic:n=..,rate=..,cv=..,groups=..")
    p.add_argument("--trace-format", default="auto", choices=["auto", "mooncake", "azure", "synthetic"])
    p.add_argument("--endpoint", help="base URL of the OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="model name to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--label", help="name of this run in reports (default: the model name)")
    p.add_argument("--start", type=int, default=0, help="index of the first trace request to replay")
    p.add_argument("--num-requests", type=int, help="how many trace requests to replay (default: all)")
    p.add_argument("--length-scale", type=float, default=1.0, help="multiply input and output lengths")
    p.add_argument("--block-tokens", type=int, help="tokens per trace hash block (default 512 × length-scale)")
    p.add_argument("--max-model-len", type=int, help="clip input+output to this many tokens (input first)")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiply inter-arrival times (2 = half the rate)")
    p.add_argument("--rate", type=float, help="replace the trace's arrivals by Poisson at R req/s")
    p.add_argument("--sweep", type=_rates, help="comma-separated rates: one Poisson run per rate")
    p.add_argument("--max-concurrency", type=int, help="cap on requests in flight (default: none)")
    p.add_argument("--warmup", type=int, default=0, help="warm-up requests before the run (not measured)")
    p.add_argument("--duration", type=float, help="send no request scheduled later than S seconds")
    p.add_argument("--slo", default="ttft=2s,tpot=100ms", help="goodput SLOs: ttft, tpot, e2e with s/ms/us")
    p.add_argument("--prompt-format", choices=["ids", "text"], default="ids",
                   help="token-id arrays (exact) or text verified to re-tokenize exactly (needs --tokenizer)")
    p.add_argument("--tokenizer", help="HF tokenizer name or directory (text prompts; vocabulary for ids)")
    p.add_argument("--vocab-size", type=int, default=32000, help="token ids are drawn below this without --tokenizer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--compare", nargs="+", metavar="REPORT.json", help="merge run/sweep reports instead of running")
    p.add_argument("--output", default="bench_results/replay", help="directory for JSON, markdown and PNGs")


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``replay`` under a ``kvfabric bench`` subparsers object; dispatch to ``run``."""
    p = sub.add_parser("replay", help="replay a request trace against an OpenAI-compatible endpoint",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


@functools.lru_cache(maxsize=None)
def _tokenizer_pool(name: str, prompt_format: str):
    """The tokenizer and the ids prompts draw from: plain word tokens for text, else every
    non-special id above the low (control-token) range. Cached: a sweep builds it once."""
    tokenizer = replay_prompts.load_tokenizer(name)
    if prompt_format == "text":
        pool = replay_prompts.word_token_pool(tokenizer)
        if len(pool) < 100:
            raise ValueError(f"tokenizer {name} has only {len(pool)} plain word tokens; use --prompt-format ids")
        return tokenizer, pool
    special = set(tokenizer.all_special_ids)
    return tokenizer, np.array([i for i in range(min(1000, len(tokenizer) // 10), len(tokenizer)) if i not in special])


def _prompt_source(args, seed: int):
    block_tokens = args.block_tokens or replay_prompts.default_block_tokens(args.length_scale)
    common = {"block_tokens": block_tokens, "length_scale": args.length_scale, "seed": seed,
              "max_model_len": args.max_model_len}
    if args.prompt_format == "text" and not args.tokenizer:
        raise ValueError("--prompt-format text needs --tokenizer")
    if not args.tokenizer:
        return replay_prompts.PromptBuilder.for_vocab(args.vocab_size, **common)
    tokenizer, pool = _tokenizer_pool(args.tokenizer, args.prompt_format)
    builder = replay_prompts.PromptBuilder(pool, **common)
    return replay_prompts.TextPrompts(builder, tokenizer) if args.prompt_format == "text" else builder


def _model(args, cfg: ClientConfig) -> str:
    if args.model:
        return args.model
    models = asyncio.run(get_json(cfg, "/v1/models")) or {}
    ids = [m.get("id") for m in models.get("data", []) if isinstance(m, dict) and m.get("id")]
    if not ids:
        raise ValueError(f"no --model given and {cfg.base_url}/v1/models lists none")
    return ids[0]


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if args.compare:
        files = write_comparison(args.compare, out)
        print(files["markdown"].read_text())
        print(f"wrote {', '.join(str(f) for f in files.values())}", file=sys.stderr)
        return 0
    if not args.trace or not args.endpoint:
        raise ValueError("--trace and --endpoint are required (or --compare REPORT.json ...)")
    if args.rate is not None and args.sweep:
        raise ValueError("--rate and --sweep exclude each other")
    trace = load_trace(args.trace, args.trace_format)
    cfg = ClientConfig(args.endpoint, "", args.api_key, args.max_concurrency, args.request_timeout,
                       progress=not args.no_progress)
    cfg.model = _model(args, cfg)
    plan = RunPlan(trace=trace, prompts=_prompt_source(args, args.seed), client=cfg, label=args.label or cfg.model,
                   start=args.start, num_requests=args.num_requests, time_scale=args.time_scale,
                   rate=args.rate, warmup=args.warmup, duration_s=args.duration, slo=parse_slo(args.slo),
                   seed=args.seed, prompt_format=args.prompt_format, max_model_len=args.max_model_len)
    if not args.sweep:
        files = write_run(run_replay(plan), out)
    else:
        runs = []
        for k, rate in enumerate(args.sweep):
            # Fresh prompts per point (same sharing structure), so one point's requests do not
            # sit in the server's prefix cache when the next point starts.
            plan.rate, plan.prompts = rate, _prompt_source(args, args.seed + k)
            report = run_replay(plan)
            write_run(report, out / f"rate_{rate:g}", with_plots=False)  # the sweep's plots hold every rate
            runs.append(report)
        files = write_sweep(sweep_report(runs), out)
    print(files["markdown"].read_text())
    print(f"wrote {', '.join(str(f) for f in files.values())}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvfabric bench replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"kvfabric bench replay: error: {e}", file=sys.stderr)
        return 2
