"""KV-cache events in vLLM's wire format: what the prefix cache stored, evicted or cleared.

A router that knows which instance holds which blocks can send a request where its prefix is
cached (proxy/prefix_index.py; llm-d and Dynamo read the same stream from vLLM). The block pool
reports three things (``KVEventCollector``): a full block registered under its hash
(``BlockStored``), a cached block reused for other tokens (``BlockRemoved``), the whole cache
dropped (``AllBlocksCleared``, also sent once at start-up so a subscriber forgets what an earlier
process on this endpoint held). The engine flushes the collector once per step into one
``KVEventBatch`` and the publisher sends it.

Wire format (vLLM's ``vllm/distributed/kv_events.py``, ``ZmqEventPublisher``):

- PUB socket at ``endpoint``; each message is three frames ``[topic, seq, payload]``: ``seq`` an
  8-byte big-endian counter starting at 0, ``payload`` msgpack of ``KVEventBatch``, a msgspec
  ``array_like`` struct: ``[ts, events]`` plus ``data_parallel_rank`` when set. Each event is a
  tagged array, the class name first: ``["BlockStored", block_hashes, parent_block_hash, token_ids,
  block_size, lora_id, medium]``, ``["BlockRemoved", block_hashes, medium]``, ``["AllBlocksCleared"]``.
  Block hashes are the engine's own 32-byte keys (engine/block_hash.py) as msgpack bin.
- ROUTER socket at ``replay_endpoint``: a subscriber that saw a gap sends the first sequence number
  it missed (8 bytes big-endian); it gets ``[seq, payload]`` for every buffered batch from there
  on, then ``[-1 (8 bytes, signed), b""]`` to say the replay is over.

Endpoints may use a wildcard port (``tcp://127.0.0.1:*``) so several engines on one host never
collide; ``endpoints`` says where they really bound (the services advertise it in Health).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

logger = logging.getLogger(__name__)

END_OF_REPLAY = (-1).to_bytes(8, "big", signed=True)


@dataclass
class KVEventsConfig:
    """vLLM's ``kv_events_config`` keys (``--kv-events-config`` JSON there, a YAML mapping here)."""

    enable_kv_cache_events: bool = False
    publisher: str = "zmq"  # "zmq" | "null" (collect nothing, send nothing)
    endpoint: str = "tcp://127.0.0.1:*"
    replay_endpoint: str | None = "tcp://127.0.0.1:*"
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000  # PUB high-water mark (messages queued per slow subscriber)
    max_queue_size: int = 100_000  # batches waiting for the publisher thread
    topic: str = "kv-events"
    data_parallel_rank: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "KVEventsConfig":
        data = dict(data or {})
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"kv_events_config: unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        cfg = cls(**data)
        if cfg.publisher not in ("zmq", "null"):
            raise ValueError(f"kv_events_config.publisher must be 'zmq' or 'null', got {cfg.publisher!r}")
        if cfg.buffer_steps < 1:
            raise ValueError("kv_events_config.buffer_steps must be >= 1")
        return cfg


class KVEventCollector:
    """What the block pool calls; events wait here until the engine's step ends (``take``)."""

    def __init__(self, medium: str) -> None:
        self.medium = medium
        self._events: list[list] = []

    def stored(self, block_hashes: list[bytes], parent: bytes | None, token_ids: list[int], block_size: int) -> None:
        self._events.append(["BlockStored", block_hashes, parent, token_ids, block_size, None, self.medium])

    def removed(self, block_hash: bytes) -> None:
        last = self._events[-1] if self._events else None
        if last is not None and last[0] == "BlockRemoved":  # one event for a step's run of evictions
            last[1].append(block_hash)
        else:
            self._events.append(["BlockRemoved", [block_hash], self.medium])

    def cleared(self) -> None:
        self._events = [["AllBlocksCleared"]]  # what came before in this step no longer matters

    def take(self) -> list[list]:
        events, self._events = self._events, []
        return events


class ZmqEventPublisher:
    """Sends batches from a thread of its own (zmq sockets stay on the thread that made them)."""

    def __init__(self, cfg: KVEventsConfig) -> None:
        self.cfg = cfg
        self._queue: queue.Queue = queue.Queue(maxsize=cfg.max_queue_size)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.endpoints: dict[str, str] = {}
        self.num_dropped = 0
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise ValueError(f"kv_events_config: cannot bind {cfg.endpoint} / {cfg.replay_endpoint}: "
                             f"{self._error}") from self._error

    def publish(self, events: list[list]) -> None:
        batch = [time.time(), events] + ([self.cfg.data_parallel_rank] if self.cfg.data_parallel_rank is not None
                                         else [])
        try:
            self._queue.put_nowait(msgpack.packb(batch, use_bin_type=True))
        except queue.Full:  # never block the engine's step for a slow event thread
            self.num_dropped += 1

    def shutdown(self) -> None:
        self._queue.put(None)
        self._thread.join(5)

    def _run(self) -> None:
        ctx = zmq.Context()
        try:
            pub = ctx.socket(zmq.PUB)
            pub.setsockopt(zmq.SNDHWM, self.cfg.hwm)
            pub.setsockopt(zmq.LINGER, 0)
            pub.bind(self.cfg.endpoint)
            self.endpoints["endpoint"] = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            replay = None
            if self.cfg.replay_endpoint:
                replay = ctx.socket(zmq.ROUTER)
                replay.setsockopt(zmq.LINGER, 0)
                replay.bind(self.cfg.replay_endpoint)
                self.endpoints["replay_endpoint"] = replay.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as e:
            self._error = e
            self._ready.set()
            ctx.destroy(linger=0)
            return
        self._ready.set()
        topic = self.cfg.topic.encode()
        buffer: deque[tuple[int, bytes]] = deque(maxlen=self.cfg.buffer_steps)
        seq = 0
        try:
            while True:
                if replay is not None and replay.poll(0):
                    self._serve_replay(replay, buffer)
                try:
                    payload = self._queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                if payload is None:
                    return
                seq_bytes = seq.to_bytes(8, "big")
                pub.send_multipart([topic, seq_bytes, payload])
                buffer.append((seq, payload))
                seq += 1
        finally:
            ctx.destroy(linger=0)

    @staticmethod
    def _serve_replay(replay: zmq.Socket, buffer: deque[tuple[int, bytes]]) -> None:
        frames = replay.recv_multipart()
        # A REQ client puts an empty delimiter between its identity and the request; a DEALER may not.
        identity, body = frames[0], frames[-1]
        envelope = [identity, b""] if len(frames) > 2 else [identity]
        if len(body) != 8:
            logger.warning("kv events replay: a request of %d bytes (want an 8-byte sequence number)", len(body))
            replay.send_multipart(envelope + [END_OF_REPLAY, b""])
            return
        start = int.from_bytes(body, "big")
        for seq, payload in buffer:
            if seq >= start:
                replay.send_multipart(envelope + [seq.to_bytes(8, "big"), payload])
        replay.send_multipart(envelope + [END_OF_REPLAY, b""])


class KVEvents:
    """The engine's side: a collector for the block pool and a publisher, flushed once per step."""

    def __init__(self, cfg: KVEventsConfig, medium: str) -> None:
        self.cfg = cfg
        self.collector = KVEventCollector(medium)
        self.publisher = ZmqEventPublisher(cfg) if cfg.publisher == "zmq" else None
        # Names this stream: a subscriber that sees a new epoch (advertised in Health) starts clean,
        # even when a restarted engine reuses the endpoint and its sequence numbers.
        self.epoch = uuid.uuid4().hex
        self.collector.cleared()  # a restarted engine's subscribers drop what the old one held

    @property
    def endpoints(self) -> dict[str, str]:
        return {**(self.publisher.endpoints if self.publisher is not None else {}), "epoch": self.epoch}

    def flush(self) -> None:
        events = self.collector.take()
        if events and self.publisher is not None:
            self.publisher.publish(events)

    def shutdown(self) -> None:
        self.flush()
        if self.publisher is not None:
            self.publisher.shutdown()


def create_kv_events(spec: dict[str, Any] | None, medium: str) -> KVEvents | None:
    cfg = KVEventsConfig.from_dict(spec)
    return KVEvents(cfg, medium) if cfg.enable_kv_cache_events else None
