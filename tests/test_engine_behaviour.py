"""Engine behaviour: prefix hits, preemption, aborts, seeded sampling, stops, bad input, no leaks."""

from __future__ import annotations

import random

import pytest

from engine import LLM, LLMEngine, EngineConfig, SamplingParams
from tests.tiny_models import make_tiny_model_dir

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir("tiny-llama", tmp_path_factory.mktemp("m") / "tiny-llama", seed=0)


def _prompts(n: int, length: int, seed: int, vocab: int = 500) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def assert_no_leak(engine: LLMEngine) -> None:
    kv = engine.kv_cache_manager
    stats = kv.stats()
    assert not engine.has_unfinished_requests()
    assert stats["num_free_blocks"] == stats["num_blocks"] - 1
    assert all(b.ref_cnt == 0 for b in kv.block_pool.blocks)
    assert engine.scheduler.held == {} and engine.scheduler.waiting_for_remote_kv == {}


def test_prefix_hit_gives_the_same_tokens(tiny_dir):
    llm = LLM(model=str(tiny_dir), dtype="float32")
    prompt = _prompts(1, 70, seed=3)[0]
    first = llm.generate([prompt], GREEDY)[0]
    second = llm.generate([prompt], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 64  # four full blocks; the last token is always recomputed
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    assert llm.llm_engine.stats()["prefix_cache_hits"] > 0
    assert_no_leak(llm.llm_engine)


def test_preempted_request_recomputes_the_same_tokens(tiny_dir):
    prompts = _prompts(4, 40, seed=4)
    lone = [LLM(model=str(tiny_dir), dtype="float32").generate([p], GREEDY)[0].outputs[0].token_ids
            for p in prompts[:1]]
    # 4 requests x ~4 blocks each do not fit in 12 blocks: the scheduler must preempt.
    llm = LLM(model=str(tiny_dir), dtype="float32", num_kv_blocks=13, max_model_len=128,
              enable_prefix_caching=False)
    outs = llm.generate(prompts, GREEDY)
    assert llm.llm_engine.scheduler.num_preemptions > 0
    ref = LLM(model=str(tiny_dir), dtype="float32")
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == ref.generate([p], GREEDY)[0].outputs[0].token_ids
    assert outs[0].outputs[0].token_ids == lone[0]
    assert_no_leak(llm.llm_engine)


def test_abort_frees_blocks_and_reports_abort(tiny_dir):
    engine = LLMEngine(EngineConfig(model=str(tiny_dir), dtype="float32"))
    for i, p in enumerate(_prompts(3, 30, seed=5)):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.abort_request("r1")
    finished = {}
    while engine.has_unfinished_requests() or not finished.get("r1"):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["r1"].outputs[0].finish_reason == "abort"
    assert finished["r0"].outputs[0].finish_reason == "length"
    assert len(finished["r0"].outputs[0].token_ids) == 50
    assert_no_leak(engine)


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_dir):
    llm = LLM(model=str(tiny_dir), dtype="float32")
    prompts = _prompts(3, 12, seed=6)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([prompts[0]], seeded)[0].outputs[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    mixed = llm.generate(prompts, [seeded, unseeded, unseeded])[0].outputs[0].token_ids
    assert alone == mixed
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=20, ignore_eos=True)
    assert llm.generate([prompts[0]], other_seed)[0].outputs[0].token_ids != alone


def test_stop_token_and_max_tokens(tiny_dir):
    llm = LLM(model=str(tiny_dir), dtype="float32")
    prompt = _prompts(1, 10, seed=7)[0]
    free_run = llm.generate([prompt], GREEDY)[0].outputs[0].token_ids
    stop_at = free_run[5]
    first_hit = free_run.index(stop_at)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[stop_at]))[0]
    assert out.outputs[0].token_ids == free_run[: first_hit + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_at
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True))[0]
    assert out.outputs[0].token_ids == free_run[:7] and out.outputs[0].finish_reason == "length"


def test_stop_string_truncates_text(default_model_dir):
    llm = LLM(dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    text = llm.generate(["The capital of France is"], params)[0].outputs[0].text
    words = text.split()
    stop = words[2]
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0.0, max_tokens=40,
                                                                     ignore_eos=True, stop=[stop]))[0]
    assert out.outputs[0].text == text[: text.index(stop)]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert_no_leak(llm.llm_engine)


def test_chat_uses_the_template(default_model_dir):
    llm = LLM(dtype="float32")
    out = llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(temperature=0.0, max_tokens=8))[0]
    tok = llm.get_tokenizer()
    expected = tok.apply_chat_template([{"role": "user", "content": "Say hello."}], add_generation_prompt=True,
                                       tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert out.prompt_token_ids == list(expected)
    assert out.outputs[0].token_ids


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "empty"),
    ([1] * 600, SamplingParams(), "maximum context length"),
    ([10**7], SamplingParams(), "token ids"),
])
def test_bad_input_is_rejected_and_engine_stays_usable(tiny_dir, prompt, params, message):
    engine = LLMEngine(EngineConfig(model=str(tiny_dir), dtype="float32", max_model_len=512))
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, params)
    engine.add_request("good", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in outs] == ["good"] and len(outs[0].outputs[0].token_ids) == 3
    assert_no_leak(engine)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 50}, "logprobs"),
])
def test_invalid_sampling_parameters_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_unknown_architecture_is_a_clear_error(tmp_path, tiny_dir):
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPTNeoXForCausalLM"], "gpt_neox"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture"):
        LLM(model=str(bad), dtype="float32")


def test_requests_added_without_streaming_are_reported_once_finished(tiny_dir):
    """stream=False (what LLM.generate uses): no per-step outputs, one final output with every
    token; a streaming request beside it still reports each step, and both get the same tokens."""
    engine = LLMEngine(EngineConfig(model=str(tiny_dir), dtype="float32"))
    prompt = _prompts(1, 20, seed=5)[0]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine.add_request("quiet", prompt, params, stream=False)
    engine.add_request("loud", prompt, params)
    seen: dict[str, list] = {"quiet": [], "loud": []}
    while engine.has_work():
        for out in engine.step():
            seen[out.request_id].append(out)
    assert [o.finished for o in seen["quiet"]] == [True]
    assert len(seen["loud"]) == 6 and seen["loud"][-1].finished
    assert seen["quiet"][0].outputs[0].token_ids == seen["loud"][-1].outputs[0].token_ids
    assert len(seen["quiet"][0].outputs[0].token_ids) == 6
    assert not engine._final_only  # nothing kept for a finished request
