"""Decode context parallelism: N ranks, each holding a shard of every sequence's KV, generate
exactly what one rank does.

The test process is rank 0 (the driver, as a decode server is); ranks 1..N-1 are real worker
processes started by decode_svc.dcp_ranks, joined over gloo (NCCL for the GPU test).
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.attention.dcp_backend import global_key_positions, local_seq_lens, local_slot_mapping
from engine.attention.merge import merge_attn_states
from engine.attention.torch_backend import attention_with_lse
from tests.tiny_models import make_tiny_model_dir

BLOCK_SIZE = 4
PROMPT_LENGTHS = (5, 13, 22, 37)  # none a multiple of the block size, of 2 or of 3 x 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir("tiny-llama", tmp_path_factory.mktemp("m") / "tiny-llama", seed=3)


def prompts(n: int = len(PROMPT_LENGTHS)) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 250) for _ in range(length)] for length in PROMPT_LENGTHS[:n]]


def config(model_dir, device: str = "cpu", dtype: str = "float32", **kw) -> EngineConfig:
    kw.setdefault("max_num_batched_tokens", 16)  # chunked prefill: later chunks see earlier ones
    kw.setdefault("max_model_len", 128)
    return EngineConfig(model=str(model_dir), dtype=dtype, device=device, block_size=BLOCK_SIZE,
                        attention_backend="torch" if device == "cpu" else "auto", **kw)


@contextlib.contextmanager
def dcp_engine(cfg: EngineConfig, size: int, kv_connector=None):
    from decode_svc.dcp_ranks import launch_dcp_group

    launch = launch_dcp_group(cfg, size)
    engine = None
    try:
        engine = LLMEngine(launch.engine_config, kv_connector=kv_connector, dcp_group=launch.group)
        yield engine
    finally:
        if engine is not None:
            engine.shutdown()
        else:
            launch.group.close()
        launch.wait()


def generate(engine: LLMEngine, token_prompts, params=GREEDY) -> list[list[int]]:
    for i, p in enumerate(token_prompts):
        engine.add_request(f"r{i}", p, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[f"r{i}"] for i in range(len(token_prompts))]


def assert_empty(engine: LLMEngine) -> None:
    s = engine.stats()
    assert s["num_free_blocks"] == s["num_blocks"] - 1


@pytest.fixture(scope="module")
def reference(model_dir):
    """One rank, ample KV: the tokens every DCP run must reproduce."""
    engine = LLMEngine(config(model_dir, num_kv_blocks=256))
    try:
        return generate(engine, prompts())
    finally:
        engine.shutdown()


# ---- the layout ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 3])
def test_every_token_is_stored_on_exactly_one_rank_at_its_global_position(size):
    seq_len, bs = 53, BLOCK_SIZE
    rounds = np.arange(1, -(-seq_len // (size * bs)) + 1)[None]  # round m -> block id m + 1 on every rank
    positions = np.arange(seq_len)
    owner = np.full(seq_len, -1)
    for rank in range(size):
        slots = local_slot_mapping(positions, np.zeros(seq_len, dtype=np.int64), rounds, rank, size, bs)
        mine = slots >= 0
        assert (owner[mine] == -1).all()
        owner[mine] = rank
        n = int(local_seq_lens(np.array([seq_len]), rank, size, bs)[0])
        assert n == mine.sum()
        # The j-th key this rank stores (in block-table order) is the token at global_key_positions[j].
        local_index = (slots[mine] // bs - 1) * bs + slots[mine] % bs
        assert sorted(local_index.tolist()) == list(range(n))
        assert global_key_positions(n, rank, size, bs, "cpu")[torch.from_numpy(local_index)].tolist() == \
            positions[mine].tolist()
    assert (owner >= 0).all()
    assert (owner == (positions // bs) % size).all()  # interleaved by block


def test_merged_shards_equal_attention_over_all_keys():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 5, 8, 32, generator=gen)
    k, v = torch.randn(1, 70, 2, 32, generator=gen), torch.randn(1, 70, 2, 32, generator=gen)
    key_pos = torch.arange(70)
    q_pos = torch.arange(65, 70)
    mask = (key_pos[None] <= q_pos[:, None])[None]
    want, want_lse = attention_with_lse(q, k, v, mask, 0.17)
    outs, lses = [], []
    for rank in range(3):  # block-interleaved shards, causal mask on global positions
        idx = global_key_positions(int(local_seq_lens(np.array([70]), rank, 3, BLOCK_SIZE)[0]), rank, 3,
                                   BLOCK_SIZE, "cpu")
        o, lse = attention_with_lse(q, k[:, idx], v[:, idx], mask[:, :, idx], 0.17)
        outs.append(o[0])
        lses.append(lse[0])
    got, got_lse = merge_attn_states(torch.stack(outs), torch.stack(lses))
    rel = ((got - want[0]).norm() / want.norm()).item()
    assert rel < 1e-6
    torch.testing.assert_close(got_lse, want_lse[0], rtol=1e-6, atol=1e-6)


# ---- N ranks generate what one does -------------------------------------------------------------------

@pytest.mark.parametrize("size", [2, 3])
def test_greedy_tokens_equal_one_rank(model_dir, reference, size):
    with dcp_engine(config(model_dir, num_kv_blocks=64), size) as engine:
        assert generate(engine, prompts()) == reference
        assert_empty(engine)


@pytest.mark.parametrize("size", [2, 3])
def test_prompt_too_long_for_one_rank_is_served_by_n(model_dir, reference, size):
    """8 usable blocks of 4 tokens per rank: 32 tokens. The 37-token prompt (+ 9 generated)
    cannot fit one rank; it fits N, with the same tokens as an unconstrained single rank."""
    with pytest.raises(ValueError, match="fewer than max_model_len"):
        LLMEngine(config(model_dir, num_kv_blocks=9, max_model_len=48))
    with dcp_engine(config(model_dir, num_kv_blocks=9, max_model_len=32 * size), size) as engine:
        assert engine.kv_cache_manager.block_pool.num_blocks == 9  # per-rank blocks, in rounds
        assert generate(engine, prompts()[3:]) == reference[3:]
        assert_empty(engine)


def test_kv_pulled_from_a_prefill_engine_lands_on_its_owners(model_dir, reference):
    """Prefill on one rank, decode on 2: rank 0's connector pulls the prompt's blocks into staging
    and each reaches the rank that owns it; the decode continues exactly."""
    from kv_connector import KVTransferConfig, create_connector

    def connector(role):
        return create_connector(KVTransferConfig(kv_connector="inproc", kv_role=role,
                                                 kv_connector_extra_config={"lease_s": 60}))

    prefill = LLMEngine(config(model_dir, num_kv_blocks=64), kv_connector=connector("kv_producer"))
    try:
        with dcp_engine(config(model_dir, num_kv_blocks=64), 2, connector("kv_consumer")) as decode:
            for i, p in enumerate(prompts()):
                rid = f"r{i}"
                prefill.add_request(rid, p, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
                                    kv_transfer_params={"do_remote_decode": True})
                first = None
                while first is None:
                    first = next((o for o in prefill.step() if o.finished), None)
                decode.add_request(rid, p, GREEDY, kv_transfer_params=first.kv_transfer_params,
                                   output_token_ids=first.outputs[0].token_ids)
                out = None
                while out is None:
                    out = next((o for o in decode.step() if o.finished), None)
                assert out.error is None
                assert out.num_cached_tokens == len(p)  # the whole prompt came over the connector
                assert out.outputs[0].token_ids == reference[i]
            assert_empty(decode)
            assert decode.connector.stats()["dcp_staging_blocks_free"] == decode.connector.stats()["dcp_staging_blocks"]
    finally:
        prefill.shutdown()


# ---- GPU: NCCL between two GPUs, the Triton decode kernel's LSE over each shard ------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_nccl_greedy_tokens_equal_one_gpu(model_dir):
    cfg = config(model_dir, device="cuda", dtype="float32", num_kv_blocks=64, enforce_eager=True)
    ref_engine = LLMEngine(cfg)
    try:
        want = generate(ref_engine, prompts())
    finally:
        ref_engine.shutdown()
    with dcp_engine(config(model_dir, device="cuda", dtype="float32", num_kv_blocks=64), 2) as engine:
        assert engine.runner.backend.inner.name == "triton"
        assert generate(engine, prompts()) == want
        assert_empty(engine)
