"""KV hand-off between two engines in one process: the zmq connector's semantics without sockets.

Producers register by ``engine_id`` in a process-wide table when their cache is registered. A
consumer's ``start_load_kv`` looks the producer up, checks the layouts, pins the held blocks,
copies the real bytes cache to cache (one vectorised index copy), and tells the producer
``done`` — all before returning; the result is reported by the next ``get_finished``, exactly
where an asynchronous transport would report it. Connector and scheduler logic can thus be
tested in milliseconds; ``zmq`` covers what only real sockets and processes show.

Extra config: ``lease_s`` (30), ``max_held_fraction`` (0.5).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from kv_connector.base import KVConnectorRole
from kv_connector.handoff import HandoffConnector, Load, layout_mismatch

_PRODUCERS: dict[str, InprocConnector] = {}
_PRODUCERS_LOCK = threading.Lock()


def _producer(engine_id: str) -> InprocConnector | None:
    with _PRODUCERS_LOCK:
        return _PRODUCERS.get(engine_id)


class InprocConnector(HandoffConnector):
    name = "inproc"

    def _start_transport(self) -> None:
        if self.role != KVConnectorRole.CONSUMER:
            with _PRODUCERS_LOCK:
                _PRODUCERS[self.engine_id] = self

    def _endpoint(self) -> tuple[str, int]:
        return "inproc", 0

    def _start_load(self, load: Load) -> None:
        producer = _producer(load.remote_engine_id)
        if producer is None:
            self.load_failed(load.request_id, f"no in-process producer engine {load.remote_engine_id!r} "
                                              "(shut down, or never started)")
            return
        why = layout_mismatch(self.wire_layout, producer.wire_layout, f"producer {producer.engine_id}")
        if why is not None:  # this request can never load: give the producer its blocks back
            producer.holds.release(load.remote_request_id, "release")
            self.load_failed(load.request_id, why)
            return
        remote_ids = producer.holds.pin(load.remote_request_id, load.first, load.count)
        if isinstance(remote_ids, str):
            self.load_failed(load.request_id, remote_ids)
            return
        try:
            src = producer._blocks[torch.tensor(remote_ids, device=producer._blocks.device)]
            self.write_blocks(torch.tensor(load.local_block_ids).numpy(), src)
        finally:
            producer.holds.unpin(load.remote_request_id)
        producer.holds.release(load.remote_request_id, "done")
        nbytes = src.numel()
        producer.count("bytes_sent", nbytes)
        self.count("bytes_received", nbytes)
        self.count("transfers")
        self.load_done(load.request_id)

    def _cancel_load(self, request_id: str) -> None:
        """Loads finish inside start_load_kv, so nothing can still be writing."""

    def _send_control(self, params: dict[str, Any], msg: dict[str, Any]) -> None:
        producer = _producer(params["remote_engine_id"])
        if producer is not None:
            producer.on_control(msg)

    def _stop_transport(self) -> None:
        with _PRODUCERS_LOCK:
            if _PRODUCERS.get(self.engine_id) is self:
                del _PRODUCERS[self.engine_id]
