"""Adaptive disaggregation: per request, is the prompt prefilled on a prefill instance or on decode?

Disaggregation pays when a prompt's prefill would stall the decode batch (DistServe's
prefill-decode interference) and when the prefill instance can take it at once; it costs a KV
transfer and a second queue (Splitwise moves a request's KV only when the prompt phase is big
enough to be worth its own machine). So, with ``policy: adaptive`` a request is prefilled on the
decode instance itself — a GenerateRequest without kv_transfer_params — when

- ``short_prompt``: it has at most ``short_prompt_tokens`` tokens decode does not already hold
  (the transfer and the extra hop cost more than the compute);
- ``prefix_cached``: decode already caches at least ``cached_fraction`` of it (a later turn of a
  conversation); the count comes from the caller (``decode_cached_tokens``: the proxy's prefix
  index, when there is one), 0 otherwise;
- ``prefill_queue``: the prefill queue would take longer to reach it than decode takes to prefill
  it (at most ``max_local_prefill_tokens`` uncached tokens, so a local prefill never stalls decode
  for long);

and on a prefill instance otherwise (``long_prompt``). ``always`` / ``never`` fix the answer
(``policy``); with no healthy prefill instance it is always decode (``no_prefill_instance``). Each
decision is counted in ``kvfabric_prefill_decisions_total{where, reason}``.

The queue estimate is this proxy's own view, with no extra RPC: the prompt tokens it has sent to
each prefill instance that have not been answered, over the throughput those answers imply
((tokens ahead at send + own uncached tokens) / latency, smoothed). An engine that reports
``prefill_queued_tokens`` or ``prefill_tokens_per_s`` in its Health stats is believed instead
(it also sees other proxies' requests). Decode's local prefill throughput is measured the same way
from its local prefills, and taken as prefill's until it has been.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from proxy.config import DisaggregationConfig
from proxy.instance import Instance
from proxy.router import Router

_SMOOTHING = 0.3  # weight of a new throughput sample
_MIN_SAMPLE_TOKENS = 128  # below this a prefill's latency is mostly fixed cost, not throughput


@dataclass(frozen=True)
class Decision:
    remote: bool  # True: prefill on a prefill instance, its KV shipped to decode
    reason: str

    @property
    def where(self) -> str:
        return "prefill" if self.remote else "decode"


class Throughput:
    """Prompt tokens in flight at one instance and the tokens per second its answers imply."""

    def __init__(self) -> None:
        self.pending = 0
        self.tokens_per_s: float | None = None

    @contextlib.contextmanager
    def track(self, num_tokens: int):
        """Around one prefill; call the yielded ``done(num_cached_tokens)`` at its first token (the
        prompt leaves the queue then, or at the end of the block if it never came)."""
        ahead, start = self.pending, time.perf_counter()
        self.pending += num_tokens
        left = False

        def done(num_cached: int = 0) -> None:
            nonlocal left
            if left:
                return
            left = True
            self.pending -= num_tokens
            work = ahead + num_tokens - num_cached
            elapsed = time.perf_counter() - start
            if work >= _MIN_SAMPLE_TOKENS and elapsed > 0:
                sample = work / elapsed
                old = self.tokens_per_s
                self.tokens_per_s = sample if old is None else (1 - _SMOOTHING) * old + _SMOOTHING * sample

        try:
            yield done
        finally:
            if not left:
                left = True
                self.pending -= num_tokens


class AdaptivePrefill:
    def __init__(self, config: DisaggregationConfig, router: Router,
                 registry: CollectorRegistry | None = None) -> None:
        self.config, self.router = config, router
        self.load: dict[str, Throughput] = defaultdict(Throughput)  # by instance address
        self.decisions = Counter("kvfabric_prefill_decisions", "Where prompts were prefilled (prefill instance or "
                                 "decode itself) and why.", ["where", "reason"],
                                 registry=registry if registry is not None else CollectorRegistry())

    def decide(self, prompt_token_ids: list[int], decode_cached_tokens: int = 0) -> Decision:
        decision = self._decide(len(prompt_token_ids), decode_cached_tokens)
        self.decisions.labels(decision.where, decision.reason).inc()
        return decision

    def _decide(self, num_tokens: int, cached: int) -> Decision:
        cfg = self.config
        prefill = [i for i in self.router.prefill if i.healthy]
        if not prefill:
            return Decision(False, "no_prefill_instance")
        if cfg.policy != "adaptive":
            return Decision(cfg.policy == "always", "policy")
        uncached = num_tokens - min(cached, num_tokens)
        if cached and cached >= cfg.cached_fraction * num_tokens and uncached <= cfg.max_local_prefill_tokens:
            return Decision(False, "prefix_cached")
        if uncached <= cfg.short_prompt_tokens:
            return Decision(False, "short_prompt")
        if uncached <= cfg.max_local_prefill_tokens and self._queue_wait_s(prefill) > self._local_prefill_s(uncached):
            return Decision(False, "prefill_queue")
        return Decision(True, "long_prompt")

    # ---- estimates -------------------------------------------------------------------------------

    def _rate(self, inst: Instance) -> float | None:
        reported = inst.stats.get("prefill_tokens_per_s")
        return reported if reported else (self.load[inst.address].tokens_per_s or self.config.prefill_tokens_per_s)

    def _queue_wait_s(self, prefill: list[Instance]) -> float:
        """How long the least-loaded prefill instance takes to reach a new prompt (0 when unknown)."""
        waits = []
        for inst in prefill:
            queued = max(self.load[inst.address].pending, inst.stats.get("prefill_queued_tokens", 0))
            rate = self._rate(inst)
            waits.append(queued / rate if rate else 0.0)
        return min(waits)

    def _local_prefill_s(self, uncached: int) -> float:
        decode = [i for i in self.router.decode + self.router.colocated if i.healthy]
        prefill_rates = [r for r in map(self._rate, self.router.prefill) if r]
        fallback = max(prefill_rates) if prefill_rates else None
        times = []
        for inst in decode:
            rate = self.load[inst.address].tokens_per_s or fallback
            if rate is None:
                return float("inf")  # nothing measured yet: no basis to keep a long prompt off prefill
            times.append((self.load[inst.address].pending + uncached) / rate)
        return min(times) if times else float("inf")

    def track(self, inst: Instance, num_tokens: int):
        """Context manager around a prefill on ``inst`` (a Prefill RPC, or a Generate that computes
        the prompt); yields ``done(num_cached_tokens)`` to call at its first token."""
        return self.load[inst.address].track(num_tokens)
