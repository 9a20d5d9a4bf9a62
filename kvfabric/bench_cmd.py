"""``kvfabric bench offline|transfer|replay|tiers ...``: each benchmark parses its own flags."""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "offline": "bench.offline",
    "transfer": "bench.kv_transfer",
    "replay": "bench.replay.cli",
    "tiers": "bench.tiers",
    "tier-ttft": "bench.tier_ttft",
    "dcp": "bench.dcp",
    "disagg-ttft": "bench.disagg_ttft",
}


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (JSON + PNG): " + ", ".join(BENCHMARKS))
    p.add_argument("benchmark", choices=sorted(BENCHMARKS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own flags (--help for each)")


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(BENCHMARKS[args.benchmark]).main(args.args) or 0
