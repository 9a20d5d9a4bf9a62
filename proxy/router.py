"""Which instance serves a request, by the configured policy, with colocated fallback.

Policies (``routing_policy`` in the proxy config):

- ``round_robin``: the next healthy instance in turn.
- ``least_load``: fewest requests in flight from this proxy, then the engine's own queue.
- ``prefix``: llm-d's precise prefix-cache scorer. Each instance's KV events (proxy/prefix_index.py)
  say which blocks it caches; an instance scores ``prefix_weight * (cached leading blocks / prompt
  blocks) + load_weight * (1 - load / (max load + 1))`` and the best score wins. When no instance
  holds more of the prompt than another, a request that names a session (the ``session_header`` header, else
  the OpenAI ``user`` field) goes where that session went last (its previous turns' KV is likely
  still there even when the events have not said so yet), else to the least loaded.

Every instance is health-checked (the Health RPC) on an interval. An instance that fails a call is
marked unhealthy at once and stays out of rotation until a health check passes again. With no
healthy prefill instance the proxy still serves: a colocated instance (or, failing that, a decode
instance, whose Generate computes the prompt itself when given no kv_transfer_params) runs both
phases. ``ready`` is stricter, for start-up: a complete path (a prefill and a decode instance, or
a colocated one, or a decode one when no prefill is configured) must be healthy.

``pick_prefill`` and ``pick_decode`` are the whole choosing API: other deciders (which side runs
the prefill) call them with the prompt and session they have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence

from proxy.config import ProxyConfig
from proxy.instance import Instance
from proxy.prefix_index import EventFollower

logger = logging.getLogger(__name__)

POLICIES = ("round_robin", "least_load", "prefix")
_MAX_SESSIONS = 100_000


class Router:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.policy = config.routing_policy
        self.prefill = [Instance(a, "prefill") for a in config.prefill_addrs]
        self.decode = [Instance(a, "decode") for a in config.decode_addrs]
        self.colocated = [Instance(a, "colocated") for a in config.colocated_addrs]
        self.events = EventFollower() if self.policy == "prefix" else None
        self.decisions: Counter[tuple[str, str, str]] = Counter()  # (role, address, reason) -> count
        self.matched_tokens: Counter[str] = Counter()  # address -> prompt tokens routed to its cache
        self._sessions: OrderedDict[tuple[str, str], str] = OrderedDict()  # (role, session) -> address
        self._turn: Counter[str] = Counter()  # role -> round-robin position
        self._task: asyncio.Task | None = None

    @property
    def instances(self) -> list[Instance]:
        return self.prefill + self.decode + self.colocated

    async def start(self) -> None:
        await self.check_all()
        self._task = asyncio.create_task(self._health_loop(), name="kvfabric-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.events is not None:
            await self.events.close()
        await asyncio.gather(*(i.close() for i in self.instances), return_exceptions=True)

    async def check_all(self) -> None:
        await asyncio.gather(*(i.check_health(self.config.health_timeout_s) for i in self.instances))
        if self.events is not None:
            for inst in self.instances:
                if inst.healthy:
                    self.events.update(inst.address, inst.info)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self.check_all()
            except Exception:  # a bug here must not stop health checking for good
                logger.exception("health check round failed")

    # ---- choosing --------------------------------------------------------------------------------

    def pick_prefill(self, exclude: set[str] = frozenset(), prompt_ids: Sequence[int] = (),
                     session: str | None = None) -> Instance | None:
        return self._pick("prefill", self.prefill, prompt_ids, exclude, session)

    def pick_decode(self, disaggregated: bool, exclude: set[str] = frozenset(), prompt_ids: Sequence[int] = (),
                    session: str | None = None) -> Instance | None:
        """A consumer for a prefilled request, or an engine that does both phases."""
        if disaggregated:
            return self._pick("decode", self.decode, prompt_ids, exclude, session)
        return (self._pick("colocated", self.colocated, prompt_ids, exclude, session)
                or self._pick("decode", self.decode, prompt_ids, exclude, session))

    def _pick(self, role: str, pool: list[Instance], prompt_ids: Sequence[int], exclude: set[str],
              session: str | None) -> Instance | None:
        healthy = [i for i in pool if i.healthy and i.address not in exclude]
        if not healthy:
            return None
        if self.policy == "round_robin":
            choice, reason = healthy[self._turn[role] % len(healthy)], "round_robin"
            self._turn[role] += 1
        elif self.policy == "prefix":
            choice, reason = self._by_prefix(role, healthy, prompt_ids, session)
        else:
            choice, reason = min(healthy, key=lambda i: i.load), "load"
        self.decisions[(role, choice.address, reason)] += 1
        if session is not None:
            self._remember(role, session, choice.address)
        return choice

    def _by_prefix(self, role: str, healthy: list[Instance], prompt_ids: Sequence[int],
                   session: str | None) -> tuple[Instance, str]:
        cfg = self.config
        matched = {i.address: self._matched_blocks(i, prompt_ids) for i in healthy}
        # Equal everywhere (a system prompt every instance holds) says nothing: decide as if uncached.
        if len(set(matched.values())) > 1 or (len(healthy) == 1 and any(matched.values())):
            loads = {i.address: sum(i.load[:2]) for i in healthy}
            top = max(loads.values()) + 1
            total = {i.address: max(1, len(prompt_ids) // max(1, int(i.info.get("hash_block_size", 1))))
                     for i in healthy}

            def score(i: Instance) -> tuple[float, int]:
                return (cfg.prefix_weight * matched[i.address] / total[i.address]
                        + cfg.load_weight * (1.0 - loads[i.address] / top), -i.num_requests)

            best = max(healthy, key=score)
            if matched[best.address]:
                self.matched_tokens[best.address] += matched[best.address] * int(best.info.get("hash_block_size", 0))
                return best, "prefix"
            return best, "load"
        if session is not None:
            address = self._sessions.get((role, session))
            for inst in healthy:
                if inst.address == address:
                    return inst, "session"
        return min(healthy, key=lambda i: i.load), "load"

    def _matched_blocks(self, inst: Instance, prompt_ids: Sequence[int]) -> int:
        if self.events is None or not prompt_ids:
            return 0
        hasher = self.events.hasher(inst.info)
        if hasher is None:
            return 0
        return self.events.index.matched_blocks(inst.address, hasher.hashes(prompt_ids))

    def _remember(self, role: str, session: str, address: str) -> None:
        key = (role, session)
        self._sessions[key] = address
        self._sessions.move_to_end(key)
        if len(self._sessions) > _MAX_SESSIONS:
            self._sessions.popitem(last=False)

    # ---- readiness -------------------------------------------------------------------------------

    def can_serve(self) -> bool:
        """Some instance can run a request end to end now (decode alone recomputes the prompt)."""
        return any(i.healthy for i in self.decode + self.colocated)

    def ready(self) -> bool:
        """A complete path is healthy: what start-up waits for before answering 200."""
        if any(i.healthy for i in self.colocated):
            return True
        decode_ok = any(i.healthy for i in self.decode)
        return decode_ok and (not self.prefill or any(i.healthy for i in self.prefill))

    def max_model_len(self) -> int | None:
        lens = [i.last_health.max_model_len for i in self.instances if i.last_health and i.last_health.max_model_len]
        return min(lens) if lens else None

    @contextlib.contextmanager
    def track(self, instance: Instance) -> Iterator[Instance]:
        instance.in_flight += 1
        instance.num_requests += 1
        try:
            yield instance
        finally:
            instance.in_flight -= 1
