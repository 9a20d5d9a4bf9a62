"""GPU engine paths against the references: Triton backend = torch backend, graphs = eager."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM, SamplingParams
from tests.tiny_models import make_tiny_model_dir

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model_dir("tiny-qwen3", tmp_path_factory.mktemp("m") / "tiny-qwen3", seed=0)


def _prompts(n, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(5, 90))] for _ in range(n)]


def _run(model_dir, prompts, **kw):
    # A small KV budget: several engines share the GPU within one test.
    llm = LLM(model=str(model_dir), dtype="float32", device="cuda", max_num_batched_tokens=64,
              kv_cache_bytes=256 << 20, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)], llm


def test_triton_backend_greedy_equals_torch_backend(model_dir):
    prompts = _prompts(12)
    ref, _ = _run(model_dir, prompts, attention_backend="torch", enforce_eager=True)
    got, _ = _run(model_dir, prompts, attention_backend="triton", enforce_eager=True)
    assert got == ref


def test_cuda_graph_replay_equals_eager(model_dir):
    prompts = _prompts(20, seed=1)
    eager, _ = _run(model_dir, prompts, attention_backend="triton", enforce_eager=True)
    graphed, llm = _run(model_dir, prompts, attention_backend="triton", max_num_seqs=32)
    assert llm.llm_engine.runner.graphs is not None and llm.llm_engine.runner.graphs.graphs
    assert graphed == eager


def test_default_model_on_gpu_matches_cpu_reference(default_model_dir):
    prompts = ["The capital of France is", "def add(a, b):"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    cpu = [o.outputs[0].token_ids for o in LLM(dtype="float32", device="cpu").generate(prompts, params)]
    gpu = [o.outputs[0].token_ids for o in LLM(dtype="float32", device="cuda", kv_cache_bytes=256 << 20).generate(prompts, params)]
    assert gpu == cpu


def test_host_staging_sends_every_array_intact_across_growth_and_reuse():
    """One pinned copy per step: each array comes back with its dtype, shape and bytes, also after
    the buffer grows, and a step's host writes never reach a previous step's copy still queued
    behind GPU work (its result is snapshotted in stream order, before the next copy)."""
    import numpy as np

    from engine.host_staging import HostStaging

    staging = HostStaging(torch.device("cuda"), initial_bytes=64)
    rng = np.random.default_rng(0)
    pending = []
    for step in range(20):
        n = int(rng.integers(1, 5000))
        arrays = [rng.integers(-2**31, 2**31 - 1, size=n + 1, dtype=np.int32),
                  rng.integers(-2**40, 2**40, size=n, dtype=np.int64),
                  rng.integers(0, 1000, size=(n % 37 + 1, 7), dtype=np.int32)]
        torch.cuda._sleep(2_000_000)  # ~1 ms of GPU work ahead of the copy
        out = staging.to_device(*arrays)
        snapshot = [t.clone() for t in out]  # queued after this copy, before the next one
        for a, t in zip(arrays, out):
            assert t.is_cuda and tuple(t.shape) == a.shape and t.dtype == torch.from_numpy(a).dtype
        pending.append((arrays, snapshot))
    for step, (arrays, snapshot) in enumerate(pending):
        for a, t in zip(arrays, snapshot):
            assert np.array_equal(t.cpu().numpy(), a), f"step {step}"
