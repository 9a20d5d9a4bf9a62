"""One engine instance as the proxy sees it: its gRPC channel, health and in-flight count."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import grpc

from protos import kvfabric_pb2 as pb
from protos import kvfabric_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

# Big prompts are a list of int32s; keep the default 4 MiB limit from capping context length.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
                    ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_permit_without_calls", 1)]


@dataclass
class Instance:
    address: str
    role: str  # "prefill" | "decode" | "colocated"
    healthy: bool = False  # false until its first health check passes
    in_flight: int = 0
    num_requests: int = 0  # ever routed here; breaks ties so equal loads alternate
    last_health: pb.HealthResponse | None = None
    stats: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # Health.stats_json as sent: numbers and routing strings
    last_error: str = ""
    unhealthy_since: float | None = None

    def __post_init__(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
        if self.role == "prefill":
            self.prefill = pb_grpc.PrefillServiceStub(self.channel)
            self._service = self.prefill
        else:
            self.decode = pb_grpc.DecodeServiceStub(self.channel)
            self._service = self.decode

    @property
    def state(self) -> str:
        """healthy | loading (answers Health, not ok yet) | unreachable | starting (not checked yet)."""
        if self.healthy:
            return "healthy"
        if self.last_error.startswith("health check: not ok"):
            return "loading"
        return "unreachable" if self.last_error else "starting"

    @property
    def load(self) -> tuple[int, int, int]:
        """Least-load order: in-flight requests from this proxy, then the engine's own queue."""
        engine_queue = (self.last_health.num_running + self.last_health.num_waiting) if self.last_health else 0
        return self.in_flight, engine_queue, self.num_requests

    async def check_health(self, timeout: float) -> bool:
        try:
            resp = await self._service.Health(pb.HealthRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            self.mark_unhealthy(f"health check: {e.code().name} {e.details()}")
            return False
        self.last_health = resp
        self.info = _stats_object(resp.stats_json)
        self.stats = {k: float(v) for k, v in self.info.items() if isinstance(v, (int, float))
                      and not isinstance(v, bool)}
        if resp.ok and not self.healthy:
            logger.info("%s instance %s is healthy", self.role, self.address)
        if not resp.ok:
            self.mark_unhealthy("health check: not ok")
        else:
            self.healthy, self.last_error, self.unhealthy_since = True, "", None
        return resp.ok

    def mark_unhealthy(self, reason: str) -> None:
        if self.healthy:
            logger.warning("%s instance %s marked unhealthy: %s", self.role, self.address, reason)
        self.healthy, self.last_error = False, reason
        self.unhealthy_since = self.unhealthy_since or time.monotonic()

    async def abort(self, request_id: str, timeout: float) -> None:
        try:
            await self._service.Abort(pb.AbortRequest(request_id=request_id), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            logger.debug("abort %s on %s failed: %s", request_id, self.address, e.code().name)

    async def close(self) -> None:
        await self.channel.close()


def _stats_object(stats_json: str) -> dict:
    if not stats_json:
        return {}
    try:
        data = json.loads(stats_json)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
