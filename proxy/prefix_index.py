"""Which instance caches which KV blocks, followed from each engine's KV events.

Each engine publishes its prefix cache's changes in vLLM's format (engine/kv_events.py: zmq PUB,
msgpack ``[ts, events]`` batches, tagged ``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``
arrays, 8-byte sequence numbers, a ROUTER socket for replay). One ``EventSubscriber`` per instance
applies them to the shared ``PrefixIndex``; the router asks it how many leading blocks of a prompt
each instance holds.

The proxy must not import the engine (DESIGN.md), so it hashes prompts with its own
``PromptHasher``: the same chained BLAKE2b as engine/block_hash.py, rooted at the seed and block
size each engine advertises in its Health stats (``block_hash_seed``, ``hash_block_size``);
tests/test_prefix_routing.py proves the two equal.

Staying right across restarts: a subscriber that sees the instance advertise a new endpoint or
event epoch (a new engine process), or the sequence go backwards, forgets the instance's blocks; a restarted engine also starts its stream
with ``AllBlocksCleared``. A gap the replay cannot fill also clears the instance (an index that
claims too little only costs a cache miss; one that claims too much routes to a cold instance).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import struct
from collections.abc import Sequence

import msgpack
import zmq
import zmq.asyncio

logger = logging.getLogger(__name__)

_HASH_BYTES = 32
_BLOCK_PERSON = b"kvfabric-blk-v1"  # the engine's BLAKE2b personalisation for block hashes
_END_OF_REPLAY = -1


class PromptHasher:
    """The engine's block keys for a prompt: hash_i = BLAKE2b(hash_{i-1}, int64 LE tokens of block i)."""

    def __init__(self, seed: bytes, block_size: int) -> None:
        if len(seed) != _HASH_BYTES or block_size < 1:
            raise ValueError("a hash seed is 32 bytes and a block size at least 1")
        self.seed, self.block_size = seed, block_size

    def hashes(self, token_ids: Sequence[int]) -> list[bytes]:
        out, parent, bs = [], self.seed, self.block_size
        for start in range(0, len(token_ids) - bs + 1, bs):
            h = hashlib.blake2b(parent, digest_size=_HASH_BYTES, person=_BLOCK_PERSON)
            h.update(struct.pack(f"<{bs}q", *token_ids[start:start + bs]))
            parent = h.digest()
            out.append(parent)
        return out


class PrefixIndex:
    """block hash -> instances holding it, and each instance's set (to clear it at once)."""

    def __init__(self) -> None:
        self._holders: dict[bytes, set[str]] = {}
        self._blocks: dict[str, set[bytes]] = {}

    def stored(self, instance: str, hashes: Sequence[bytes]) -> None:
        mine = self._blocks.setdefault(instance, set())
        for h in hashes:
            mine.add(h)
            self._holders.setdefault(h, set()).add(instance)

    def removed(self, instance: str, hashes: Sequence[bytes]) -> None:
        mine = self._blocks.get(instance, set())
        for h in hashes:
            mine.discard(h)
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(instance)
                if not holders:
                    del self._holders[h]

    def cleared(self, instance: str) -> None:
        self.removed(instance, list(self._blocks.pop(instance, ())))

    def num_blocks(self, instance: str) -> int:
        return len(self._blocks.get(instance, ()))

    def matched_blocks(self, instance: str, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of the prompt the instance holds (a chain: stop at the first miss)."""
        mine = self._blocks.get(instance)
        if not mine:
            return 0
        n = 0
        for h in hashes:
            if h not in mine:
                break
            n += 1
        return n


class EventSubscriber:
    """Follows one instance's KV events into the index (an asyncio task; restarted on new endpoints)."""

    def __init__(self, instance: str, index: PrefixIndex, ctx: zmq.asyncio.Context) -> None:
        self.instance, self.index, self.ctx = instance, index, ctx
        self.endpoint: str | None = None
        self.replay_endpoint: str | None = None
        self.topic = "kv-events"
        self.last_seq = -1
        self.num_events = 0
        self.num_replayed = 0
        self._key: tuple | None = None
        self._task: asyncio.Task | None = None

    def follow(self, endpoint: str, replay_endpoint: str | None, topic: str, epoch: str = "") -> None:
        """Subscribe there, unless already doing so; a new endpoint or epoch is a new engine: start clean."""
        key = (endpoint, replay_endpoint, topic, epoch)
        if key == self._key and self._task:
            return
        self.stop()
        self.index.cleared(self.instance)
        self._key = key
        self.endpoint, self.replay_endpoint, self.topic, self.last_seq = endpoint, replay_endpoint, topic, -1
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"kv-events-{self.instance}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(self.endpoint)
        sub.setsockopt_string(zmq.SUBSCRIBE, self.topic)
        replay = None
        if self.replay_endpoint:
            replay = self.ctx.socket(zmq.DEALER)
            replay.setsockopt(zmq.LINGER, 0)
            replay.connect(self.replay_endpoint)
        try:
            if replay is not None:  # catch up on what the engine published before we joined
                await self._replay(replay, 0, None)
            while True:
                _topic, seq_bytes, payload = await sub.recv_multipart()
                seq = int.from_bytes(seq_bytes, "big")
                if seq <= self.last_seq:
                    if seq < self.last_seq:  # sequence went back: the publisher restarted
                        logger.info("KV events of %s restarted at seq %d: clearing its index", self.instance, seq)
                        self.index.cleared(self.instance)
                        self.last_seq = -1  # the new stream from its start: replay what came before seq
                    else:
                        continue  # already had it from the replay
                if seq > self.last_seq + 1:
                    if replay is None or not await self._replay(replay, self.last_seq + 1, seq - 1):
                        logger.warning("KV events of %s: seq %d..%d lost; clearing its index",
                                       self.instance, self.last_seq + 1, seq - 1)
                        self.index.cleared(self.instance)
                self._apply(payload)
                self.last_seq = seq
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("KV event subscriber of %s failed; clearing its index", self.instance)
            self.index.cleared(self.instance)
        finally:
            sub.close(linger=0)
            if replay is not None:
                replay.close(linger=0)

    async def _replay(self, replay: zmq.asyncio.Socket, start: int, upto: int | None) -> bool:
        """Apply the buffered batches from ``start`` (through ``upto``; None: all there are), in order;
        whether the gap is filled (False when the buffer no longer reaches back that far)."""
        await replay.send_multipart([b"", start.to_bytes(8, "big")])
        while await replay.poll(5000):
            frames = await replay.recv_multipart()
            seq_bytes, payload = frames[-2], frames[-1]
            if not payload and int.from_bytes(seq_bytes, "big", signed=True) == _END_OF_REPLAY:
                return upto is None or self.last_seq >= upto
            seq = int.from_bytes(seq_bytes, "big")
            if seq == self.last_seq + 1 and (upto is None or seq <= upto):
                self._apply(payload)
                self.last_seq = seq
                self.num_replayed += 1
        return False

    def _apply(self, payload: bytes) -> None:
        batch = msgpack.unpackb(payload, raw=False)
        for event in batch[1]:
            kind = event[0]
            self.num_events += 1
            if kind == "BlockStored":
                self.index.stored(self.instance, event[1])
            elif kind == "BlockRemoved":
                self.index.removed(self.instance, event[1])
            elif kind == "AllBlocksCleared":
                self.index.cleared(self.instance)


class EventFollower:
    """One subscriber per instance that advertises an event stream; owned by the router."""

    def __init__(self) -> None:
        self.index = PrefixIndex()
        self.ctx = zmq.asyncio.Context()
        self.subscribers: dict[str, EventSubscriber] = {}
        self._hashers: dict[tuple[bytes, int], PromptHasher] = {}

    def update(self, address: str, info: dict[str, str | float]) -> None:
        """From an instance's Health stats: follow its advertised endpoint (host rewritten if a wildcard)."""
        endpoint = info.get("kv_events_endpoint")
        if not isinstance(endpoint, str):
            return
        replay = info.get("kv_events_replay_endpoint")
        host = address.rsplit(":", 1)[0]
        sub = self.subscribers.setdefault(address, EventSubscriber(address, self.index, self.ctx))
        sub.follow(_reachable(endpoint, host), _reachable(replay, host) if isinstance(replay, str) else None,
                   str(info.get("kv_events_topic", "kv-events")), str(info.get("kv_events_epoch", "")))

    def hasher(self, info: dict) -> PromptHasher | None:
        seed, bs = info.get("block_hash_seed"), info.get("hash_block_size")
        if not isinstance(seed, str) or not isinstance(bs, (int, float)):
            return None
        key = (bytes.fromhex(seed), int(bs))
        if key not in self._hashers:
            self._hashers[key] = PromptHasher(*key)
        return self._hashers[key]

    def forget(self, address: str) -> None:
        self.index.cleared(address)

    async def close(self) -> None:
        for sub in self.subscribers.values():
            sub.stop()
        await asyncio.sleep(0)
        with contextlib.suppress(Exception):
            self.ctx.destroy(linger=0)


def _reachable(endpoint: str, host: str) -> str:
    """An engine bound to every interface advertises 0.0.0.0 or *: reach it where its gRPC is."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://*:", "tcp://[::]:"):
        if endpoint.startswith(wildcard):
            return f"tcp://{host}:{endpoint[len(wildcard):]}"
    return endpoint
