"""Server counters scraped from ``GET /metrics`` (Prometheus text) before and after a run.

Only the server's own families are kept (``kvfabric_*`` and vLLM's ``vllm:*``); whatever of them
exist are reported, so the same benchmark reads kvfabric's tier hits and KV bytes moved or
vLLM's prefix-cache counters without knowing their names. Counters (and histogram/summary
``_sum``/``_count``) are reported as deltas over the run, gauges as their value after it. Any
``...hits...`` counter with a matching ``...queries...``/``...lookups...``/``...misses...`` one
also yields a hit rate over the run.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

PREFIXES = ("kvfabric_", "vllm:")
_CUMULATIVE_TYPES = ("counter", "histogram", "summary", "gaugehistogram")


def _key(name: str, labels: dict) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def parse_prometheus(text: str) -> dict[str, dict]:
    """Sample key → ``{"type": family type, "value": float}`` for the server's families."""
    samples = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(PREFIXES):
            continue
        for s in family.samples:
            if s.name.endswith(("_bucket", "_created")):
                continue
            samples[_key(s.name, s.labels)] = {"type": family.type, "value": float(s.value)}
    return samples


def _hit_rates(deltas: dict[str, float]) -> dict[str, float]:
    rates = {}
    for key, hits in deltas.items():
        if "hits" not in key:
            continue
        for other, is_total in (("queries", True), ("lookups", True), ("misses", False)):
            denom = deltas.get(key.replace("hits", other))
            if denom is None:
                continue
            total = denom if is_total else denom + hits
            if total > 0:
                rates[key.replace("hits", "hit_rate").replace("_total", "")] = hits / total
            break
    return rates


def server_metric_deltas(before: str | None, after: str | None) -> dict:
    if before is None or after is None:
        return {"available": False}
    try:
        b, a = parse_prometheus(before), parse_prometheus(after)
    except ValueError as e:
        return {"available": False, "error": f"unparseable /metrics: {e}"}
    counters, gauges = {}, {}
    for key, sample in a.items():
        if sample["type"] in _CUMULATIVE_TYPES or key.endswith("_total"):
            counters[key] = sample["value"] - b.get(key, {"value": 0.0})["value"]
        else:
            gauges[key] = sample["value"]
    return {"available": True, "counters": counters, "gauges": gauges, "hit_rates": _hit_rates(counters)}
