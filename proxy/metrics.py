"""What ``GET /metrics`` exposes: vLLM's names where the concept is the same, kvfabric_* otherwise.

Request-level series (``vllm:*``) are measured here, at the proxy, so they include routing and
the KV hand-off: TTFT is arrival → first token (the prefill's), inter-token latency the gap
between stream chunks, e2e arrival → last token. ``vllm:num_requests_running`` counts requests
in flight at this proxy and ``vllm:num_requests_waiting`` the engines' reported queues.
Engine state comes from each instance's last Health answer: ``kvfabric_instance_*`` gauges and,
for every number in its ``stats_json``, a ``kvfabric_<name>`` gauge labelled by instance.
"""

from __future__ import annotations

import re
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from proxy.router import Router

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ProxyMetrics:
    def __init__(self, model_name: str, router: Router, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        r, labels = self.registry, ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token (arrival at the proxy "
                              "to the first token, i.e. the prefill).", labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between successive streamed chunks.",
                             labels, buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of admitted requests.", labels, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", labels, registry=r)
        self.success = Counter("vllm:request_success", "Requests finished, by finish reason.",
                               labels + ["finished_reason"], registry=r)
        self.running = Gauge("vllm:num_requests_running", "Requests in flight at this proxy.", labels, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting in the engines' queues.", labels,
                             registry=r)
        self.waiting.labels(model_name).set_function(
            lambda: sum(i.last_health.num_waiting for i in router.instances if i.last_health and i.healthy))
        # Per instance (vllm:* above are per model): TTFT by the instance that made the first token
        # (the prefill, or the colocated/decode one that did both), TPOT by the decode instance.
        self.instance_ttft = Histogram("kvfabric_instance_ttft_seconds", "Time to first token, by the instance "
                                       "that computed the prompt.", ["instance"], buckets=_LATENCY_BUCKETS, registry=r)
        self.instance_tpot = Histogram("kvfabric_instance_tpot_seconds", "Time per output token after the first, "
                                       "by the decode instance.", ["instance"], buckets=_ITL_BUCKETS, registry=r)
        self.errors = Counter("kvfabric_request_errors", "Requests that failed, by HTTP status.",
                              labels + ["status"], registry=r)
        self.registry.register(_InstanceCollector(router))

    def start(self, num_prompt_tokens: int, route=None) -> "RequestTimer":
        """``route``: the request's RequestRoute (proxy/engine_client.py), for the per-instance series."""
        return RequestTimer(self, num_prompt_tokens, route)


class RequestTimer:
    """One request's timing; ``finish`` is idempotent so every exit path may call it."""

    def __init__(self, metrics: ProxyMetrics, num_prompt_tokens: int, route=None) -> None:
        self.m, self.model, self.route = metrics, metrics.model_name, route
        self.arrival = self.last = self.first_at = time.perf_counter()
        self.num_tokens = 0
        self.num_prompt_tokens = num_prompt_tokens
        self.first = True
        self.done = False
        self.m.running.labels(self.model).inc()

    def on_tokens(self, n: int) -> None:
        now = time.perf_counter()
        if self.first:  # counted once an engine has accepted the prompt, as vLLM counts admitted ones
            self.m.prompt_tokens.labels(self.model).inc(self.num_prompt_tokens)
        (self.m.ttft if self.first else self.m.itl).labels(self.model).observe(now - (self.arrival if self.first
                                                                                        else self.last))
        if self.first:
            self.first_at = now
            where = self.route and (self.route.prefill or self.route.decode)
            if where:
                self.m.instance_ttft.labels(where).observe(now - self.arrival)
        self.num_tokens += n
        self.first, self.last = False, now
        self.m.generation_tokens.labels(self.model).inc(n)

    def finish(self, finish_reason: str | None, error_status: int | None = None) -> None:
        if self.done:
            return
        self.done = True
        self.m.running.labels(self.model).dec()
        if finish_reason:
            self.m.success.labels(self.model, finish_reason).inc()
            self.m.e2e.labels(self.model).observe(time.perf_counter() - self.arrival)
            if self.route is not None and self.route.decode and self.num_tokens > 1:
                self.m.instance_tpot.labels(self.route.decode).observe(
                    (self.last - self.first_at) / (self.num_tokens - 1))
        elif error_status is not None:
            self.m.errors.labels(self.model, str(error_status)).inc()


class _InstanceCollector:
    """Reads the router's last Health answers at scrape time (no polling of its own)."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def collect(self):
        labels = ["instance", "role"]
        healthy = GaugeMetricFamily("kvfabric_instance_healthy", "1 if the instance passes health checks.",
                                    labels=labels)
        in_flight = GaugeMetricFamily("kvfabric_instance_in_flight", "Requests this proxy has in flight there.",
                                      labels=labels)
        usage = GaugeMetricFamily("kvfabric_kv_cache_usage", "Fraction of KV blocks in use (engine-reported).",
                                  labels=labels)
        queue = {k: GaugeMetricFamily(f"kvfabric_engine_num_{k}", f"Engine-reported {k} requests.", labels=labels)
                 for k in ("running", "waiting")}
        stats: dict[str, GaugeMetricFamily] = {}
        for inst in self.router.instances:
            key = [inst.address, inst.role]
            healthy.add_metric(key, 1.0 if inst.healthy else 0.0)
            in_flight.add_metric(key, inst.in_flight)
            if inst.last_health is None:
                continue
            usage.add_metric(key, inst.last_health.kv_cache_usage)
            queue["running"].add_metric(key, inst.last_health.num_running)
            queue["waiting"].add_metric(key, inst.last_health.num_waiting)
            for name, value in inst.stats.items():
                metric = f"kvfabric_{_sanitize(name)}"
                if metric in _BUILTIN:
                    metric = f"kvfabric_engine_{_sanitize(name)}"
                if metric not in stats:
                    stats[metric] = GaugeMetricFamily(metric, f"Engine stat {name!r} from Health.stats_json.",
                                                      labels=labels)
                stats[metric].add_metric(key, value)
        yield from (healthy, in_flight, usage, *queue.values(), *stats.values())
        yield from self._routing()

    def _routing(self):
        """What the router decided (proxy/router.py): per role, instance and why."""
        decisions = CounterMetricFamily("kvfabric_routing_decisions", "Requests routed, by role, instance and "
                                        "reason (prefix, session, load, round_robin).",
                                        labels=["role", "instance", "reason"])
        for (role, address, reason), n in sorted(self.router.decisions.items()):
            decisions.add_metric([role, address, reason], n)
        matched = CounterMetricFamily("kvfabric_routing_matched_tokens", "Prompt tokens routed to an instance "
                                      "whose KV events say it caches them (prefix policy).", labels=["instance"])
        for address, n in sorted(self.router.matched_tokens.items()):
            matched.add_metric([address], n)
        indexed = GaugeMetricFamily("kvfabric_routing_indexed_blocks", "Blocks the prefix index holds per "
                                    "instance (from its KV events).", labels=["instance"])
        if self.router.events is not None:
            for inst in self.router.instances:
                indexed.add_metric([inst.address], self.router.events.index.num_blocks(inst.address))
        yield from (decisions, matched, indexed)


_BUILTIN = {"kvfabric_instance_healthy", "kvfabric_instance_in_flight", "kvfabric_kv_cache_usage",
            "kvfabric_engine_num_running", "kvfabric_engine_num_waiting", "kvfabric_request_errors"}


def _sanitize(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name).strip("_").lower() or "stat"
