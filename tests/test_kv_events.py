"""KV events from a real engine, read by a subscriber written from vLLM's documented schema.

The subscriber below decodes with plain ``msgpack`` following vLLM's kv_events_subscriber example
(``KVEventBatch = [ts, events, data_parallel_rank?]``, events tagged arrays, frames
``[topic, seq (8 bytes big-endian), payload]``, replay over a ROUTER socket ending with seq -1). It
uses nothing of engine/kv_events.py, so an encoder bug cannot hide behind a matching decoder bug.
"""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.block_hash import extend_block_hashes
from tests.tiny_models import make_tiny_model_dir

BLOCK = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir("tiny-llama", tmp_path_factory.mktemp("m") / "tiny-llama", seed=5)


class VLLMSubscriber:
    """Replays vLLM's events into a set of cached hashes (what a router's index would hold)."""

    def __init__(self, endpoint: str, replay_endpoint: str, topic: str = "kv-events") -> None:
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.connect(endpoint)
        self.sub.setsockopt_string(zmq.SUBSCRIBE, topic)
        self.replay = self.ctx.socket(zmq.DEALER)
        self.replay.connect(replay_endpoint)
        self.cached: set[bytes] = set()
        self.tokens: dict[bytes, list[int]] = {}
        self.last_seq = -1
        self.kinds: list[str] = []

    def apply(self, payload: bytes) -> None:
        batch = msgpack.unpackb(payload, raw=False)
        assert isinstance(batch, list) and len(batch) in (2, 3) and isinstance(batch[0], float)
        for ev in batch[1]:
            kind = ev[0]
            self.kinds.append(kind)
            if kind == "BlockStored":
                hashes, parent, token_ids, block_size, lora_id, medium = ev[1:]
                assert block_size == BLOCK and lora_id is None and medium == "CPU"
                assert len(token_ids) == block_size * len(hashes)
                assert parent is None or isinstance(parent, bytes)
                for i, h in enumerate(hashes):
                    self.cached.add(h)
                    self.tokens[h] = token_ids[i * block_size:(i + 1) * block_size]
            elif kind == "BlockRemoved":
                hashes, medium = ev[1:]
                self.cached.difference_update(hashes)
            elif kind == "AllBlocksCleared":
                assert len(ev) == 1
                self.cached.clear()
            else:
                raise AssertionError(f"unknown event {ev!r}")

    def drain(self, quiet_s: float = 1.0, skip: set[int] = frozenset()) -> None:
        """Read until nothing arrives for ``quiet_s``; sequence numbers in ``skip`` are 'lost'."""
        while self.sub.poll(int(quiet_s * 1000)):
            topic, seq_bytes, payload = self.sub.recv_multipart()
            assert topic == b"kv-events" and len(seq_bytes) == 8
            seq = int.from_bytes(seq_bytes, "big")
            if seq in skip:
                continue
            if seq > self.last_seq + 1:
                self.replay_from(self.last_seq + 1, upto=seq - 1)
            self.apply(payload)
            self.last_seq = seq

    def replay_from(self, start: int, upto: int) -> None:
        self.replay.send_multipart([b"", start.to_bytes(8, "big")])
        while True:
            assert self.replay.poll(5000), "replay did not answer"
            frames = self.replay.recv_multipart()
            seq_bytes, payload = frames[-2], frames[-1]
            if not payload:
                assert int.from_bytes(seq_bytes, "big", signed=True) == -1
                return
            seq = int.from_bytes(seq_bytes, "big")
            if self.last_seq < seq <= upto:
                self.apply(payload)
                self.last_seq = seq

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def _engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), device="cpu", dtype="float32", block_size=BLOCK,
                                  max_model_len=256, num_kv_blocks=24, seed=0,
                                  kv_events_config={"enable_kv_cache_events": True, **kw}))


def _run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int = 8) -> None:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{time.monotonic_ns()}-{i}", p, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                               ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()


def _cache_contents(engine: LLMEngine) -> set[bytes]:
    return set(engine.kv_cache_manager.block_pool.cached_blocks)


def test_events_equal_the_cache_and_replay_fills_a_gap(model_dir):
    engine = _engine(model_dir)
    info = engine.routing_info()
    sub = VLLMSubscriber(info["kv_events_endpoint"], info["kv_events_replay_endpoint"])
    try:
        time.sleep(0.3)  # PUB/SUB slow joiner: the start-up AllBlocksCleared is fetched by replay below
        shared = list(range(100, 148))  # three full blocks every prompt shares
        # 23 usable blocks of 16 tokens: the later prompts evict the earlier ones' blocks.
        workload = [[shared + list(range(200 + 40 * k, 200 + 40 * k + 20 + 7 * k))] for k in range(6)]
        _run(engine, workload[0][0:1] + workload[1][0:1])
        sub.drain(skip={2, 3})  # pretend batches 2 and 3 never arrived: the replay must fill them
        for w in workload[2:]:
            _run(engine, w)
        sub.drain()
        assert sub.kinds[0] == "AllBlocksCleared"
        assert {"BlockStored", "BlockRemoved"} <= set(sub.kinds)
        assert sub.cached == _cache_contents(engine) and sub.cached
        # The stored tokens are what the engine hashed: re-hashing them from the seed gives the keys.
        for h, blk in engine.kv_cache_manager.block_pool.cached_blocks.items():
            assert len(sub.tokens[h]) == BLOCK
        req = type("R", (), {})()
        req.prompt_token_ids, req.output_token_ids, req.block_hashes = shared, [], []
        extend_block_hashes(req, BLOCK, bytes.fromhex(info["block_hash_seed"]))
        assert [sub.tokens.get(h) for h in req.block_hashes] == [shared[i:i + BLOCK] for i in range(0, 48, BLOCK)]

        assert engine.kv_cache_manager.reset_prefix_cache()
        engine.step()  # the engine flushes its events once per step
        sub.drain()
        assert sub.kinds[-1] == "AllBlocksCleared" and sub.cached == set() == _cache_contents(engine)
    finally:
        sub.close()
        engine.shutdown()


def test_a_replay_request_from_zero_returns_the_whole_buffer(model_dir):
    engine = _engine(model_dir, buffer_steps=3)
    info = engine.routing_info()
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)  # vLLM's example subscriber replays over REQ
    req.connect(info["kv_events_replay_endpoint"])
    try:
        _run(engine, [list(range(300, 340))], max_tokens=60)  # a new full block every 16 steps
        time.sleep(0.5)
        req.send((0).to_bytes(8, "big"))
        assert req.poll(5000)
        seq_bytes, payload = req.recv_multipart()
        # A buffer of three batches keeps only the last three: the first replayed one is not seq 0.
        assert int.from_bytes(seq_bytes, "big") > 0 and msgpack.unpackb(payload)[1]
    finally:
        ctx.destroy(linger=0)
        engine.shutdown()


def test_bad_kv_events_config_is_refused(model_dir):
    with pytest.raises(ValueError, match="unknown key"):
        _engine(model_dir, endpoitn="tcp://127.0.0.1:*")
    with pytest.raises(ValueError, match="publisher"):
        _engine(model_dir, publisher="kafka")
