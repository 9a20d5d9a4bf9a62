"""Greedy output equals HF transformers token for token (fp32, CPU), with chunked prefill and
continuous batching really happening."""

from __future__ import annotations

import random

import pytest

from engine import LLM, SamplingParams
from tests.hf_reference import hf_greedy, load_hf_model
from tests.tiny_models import make_tiny_model_dir

PRESETS = ["tiny-llama", "tiny-llama3", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"]


def _random_prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("preset", PRESETS)
def test_tiny_model_greedy_matches_hf(preset, tmp_path):
    model_dir = make_tiny_model_dir(preset, tmp_path / preset, seed=0)
    hf = load_hf_model(model_dir)
    prompts = _random_prompts(hf.config.vocab_size, [3, 17, 40, 75], seed=1)
    # A 24-token budget splits the longer prompts into chunks and mixes them with decodes.
    llm = LLM(model=str(model_dir), dtype="float32", max_num_batched_tokens=24, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 32)
        assert out.outputs[0].finish_reason == "length"
    stats = llm.llm_engine.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] - 1


def test_default_model_greedy_matches_hf(default_model_dir):
    hf = load_hf_model(default_model_dir)
    llm = LLM(dtype="float32", max_num_batched_tokens=48, max_num_seqs=3)
    tok = llm.get_tokenizer()
    texts = ["The capital of France is",
             "Write a haiku about the sea.",
             "In 1905, Albert Einstein published four papers that changed physics. The first one"]
    prompts = [tok(t).input_ids for t in texts]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 40)
        assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids, skip_special_tokens=True)
