"""Which instance serves a request: least in-flight among the healthy, with colocated fallback.

Every instance is health-checked (the Health RPC) on an interval. An instance that fails a call
is marked unhealthy at once and stays out of rotation until a health check passes again. With no
healthy prefill instance the proxy still serves: a colocated instance (or, failing that, a
decode instance, whose Generate computes the prompt itself when given no kv_transfer_params)
runs both phases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from proxy.config import ProxyConfig
from proxy.instance import Instance

logger = logging.getLogger(__name__)


class Router:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.prefill = [Instance(a, "prefill") for a in config.prefill_addrs]
        self.decode = [Instance(a, "decode") for a in config.decode_addrs]
        self.colocated = [Instance(a, "colocated") for a in config.colocated_addrs]
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
        await asyncio.gather(*(i.close() for i in self.instances), return_exceptions=True)

    async def check_all(self) -> None:
        await asyncio.gather(*(i.check_health(self.config.health_timeout_s) for i in self.instances))

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self.check_all()
            except Exception:  # a bug here must not stop health checking for good
                logger.exception("health check round failed")

    # ---- choosing --------------------------------------------------------------------------------

    def pick_prefill(self, exclude: set[str] = frozenset()) -> Instance | None:
        return _least_loaded(self.prefill, exclude)

    def pick_decode(self, disaggregated: bool, exclude: set[str] = frozenset()) -> Instance | None:
        """A consumer for a prefilled request, or an engine that does both phases."""
        if disaggregated:
            return _least_loaded(self.decode, exclude)
        return _least_loaded(self.colocated, exclude) or _least_loaded(self.decode, exclude)

    def can_serve(self) -> bool:
        return any(i.healthy for i in self.decode + self.colocated)

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


def _least_loaded(instances: list[Instance], exclude: set[str]) -> Instance | None:
    healthy = [i for i in instances if i.healthy and i.address not in exclude]
    return min(healthy, key=lambda i: i.load) if healthy else None
