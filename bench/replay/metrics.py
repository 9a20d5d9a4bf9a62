"""Serving metrics from per-request timings: TTFT, TPOT, ITL, E2E, throughput, goodput.

Definitions (the ones vLLM's serving benchmark and the DistServe goodput paper use):

- TTFT: send → first streamed chunk.  E2E: send → last chunk.
- TPOT, per request: ``(e2e - ttft) / (output_tokens - 1)``; undefined for one-token outputs.
- ITL: every gap between consecutive chunks of every request, pooled.
- Throughput: completed requests (or their output tokens) over the run's wall time.
- Goodput: completed requests meeting every SLO, per second of wall time; SLO attainment is the
  same count over all requests sent (failed ones count as misses).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable

import numpy as np

from bench.replay.client import RequestRecord

PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft", "tpot", "e2e")
_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


def parse_duration(text: str) -> float:
    """``'2s'``, ``'100ms'``, ``'250us'`` → seconds. A bare number is refused: its unit is a guess."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(s|ms|us)\s*", text)
    if not m:
        raise ValueError(f"not a duration with a unit (s, ms, us): {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_slo(text: str | None) -> dict[str, float]:
    """``'ttft=2s,tpot=100ms'`` → ``{'ttft': 2.0, 'tpot': 0.1}`` (seconds)."""
    slo = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"SLO item {item!r}: expected one of {SLO_KEYS} as key=value")
        slo[key] = parse_duration(value)
    return slo


def stats(values: Iterable[float]) -> dict:
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        return {"count": 0, "mean": None, **{f"p{p}": None for p in PERCENTILES}}
    return {"count": int(arr.size), "mean": float(arr.mean()),
            **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


def tpot(record: RequestRecord) -> float | None:
    if not record.ok or record.output_tokens < 2:
        return None
    return (record.e2e_s - record.ttft_s) / (record.output_tokens - 1)


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    if not record.ok:
        return False
    t = tpot(record)
    return (record.ttft_s <= slo.get("ttft", float("inf"))
            and (t is None or t <= slo.get("tpot", float("inf")))
            and record.e2e_s <= slo.get("e2e", float("inf")))


def summarize(records: list[RequestRecord], wall_s: float, slo: dict[str, float]) -> dict:
    ok = [r for r in records if r.ok]
    good = [r for r in ok if meets_slo(r, slo)]
    wall = max(wall_s, 1e-9)
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": wall_s,
        "request_throughput": len(ok) / wall,
        "output_throughput": out_tokens / wall,
        "input_throughput": sum(r.input_len for r in ok) / wall,
        "total_output_tokens": out_tokens,
        "total_input_tokens": sum(r.input_len for r in ok),
        "ttft": {**stats(r.ttft_s for r in ok), "unit": "s"},
        "tpot": {**stats(t for t in map(tpot, ok) if t is not None), "unit": "s"},
        "itl": {**stats(x for r in ok for x in r.itl_s), "unit": "s"},
        "e2e": {**stats(r.e2e_s for r in ok), "unit": "s"},
        "client_queue": {**stats(r.sent_s - r.scheduled_s for r in records if r.sent_s is not None), "unit": "s"},
        "slo": slo,
        "goodput": len(good) / wall,
        "slo_attainment": len(good) / len(records) if records else None,
        "short_outputs": sum(1 for r in ok if r.output_tokens < r.output_len),
        "errors": dict(sorted(Counter(r.error for r in records if not r.ok).items())),
    }


_NICE_BINS_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)


def output_throughput_timeline(records: list[RequestRecord], bin_s: float | None = None) -> dict:
    """Output tokens per second and completions per second, in ``bin_s`` bins of run time
    (default: the smallest round bin giving at most 100 bins).
    Chunk times are rebuilt from send + TTFT + the ITL gaps; a chunk counts as
    ``output_tokens / chunks`` tokens so the bins add up to the server's usage."""
    token_times, token_weights, done_times = [], [], []
    for r in records:
        if not r.ok:
            continue
        times = r.sent_s + r.ttft_s + np.concatenate([[0.0], np.cumsum(r.itl_s)])
        token_times.append(times)
        token_weights.append(np.full(len(times), r.output_tokens / len(times)))
        done_times.append(r.sent_s + r.e2e_s)
    if not done_times:
        return {"bin_s": bin_s or 1.0, "t": [], "output_tokens_per_s": [], "requests_per_s": []}
    end = max(done_times)
    if bin_s is None:
        bin_s = next((b for b in _NICE_BINS_S if end / b <= 100), _NICE_BINS_S[-1])
    edges = np.arange(0.0, end + bin_s, bin_s)
    if len(edges) < 2:
        edges = np.array([0.0, bin_s])
    tok, _ = np.histogram(np.concatenate(token_times), bins=edges, weights=np.concatenate(token_weights))
    req, _ = np.histogram(done_times, bins=edges)
    return {"bin_s": bin_s, "t": edges[:-1].tolist(), "output_tokens_per_s": (tok / bin_s).tolist(),
            "requests_per_s": (req / bin_s).tolist()}
