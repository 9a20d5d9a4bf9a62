"""The sampler, on synthetic logits: greedy, seeded reproducibility, filters, penalties, logprobs."""

from __future__ import annotations

import pytest
import torch

from engine.sampler import (
    Sampler,
    SamplingBatch,
    advance_generator,
    apply_top_k_top_p_min_p,
    process_logits,
)
from engine.sampling_params import SamplingParams

V = 32
EOS = 2


def make_batch(params, prompts=None, outputs=None, seeds=None, eos=frozenset({EOS})) -> SamplingBatch:
    n = len(params)
    seeds = seeds if seeds is not None else [p.seed for p in params]
    return SamplingBatch(
        params=list(params),
        prompt_token_ids=prompts if prompts is not None else [[] for _ in range(n)],
        output_token_ids=outputs if outputs is not None else [[] for _ in range(n)],
        generators=[None if s is None else torch.Generator().manual_seed(s) for s in seeds],
        eos_token_ids=eos,
    )


def random_logits(rows: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def sample_stream(logits_per_step, params, generator):
    """Sample one row over several steps with a persistent generator, as the model runner does."""
    sampler = Sampler()
    out = []
    for logits in logits_per_step:
        batch = SamplingBatch([params], [[]], [list(out)], [generator], frozenset())
        out.append(int(sampler(logits.unsqueeze(0), batch).token_ids[0]))
    return out


# ---- greedy ----------------------------------------------------------------------------------------


def test_greedy_rows_take_the_argmax():
    logits = random_logits(6)
    out = Sampler()(logits, make_batch([SamplingParams(temperature=0.0)] * 6))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_greedy_ignores_top_k_top_p_and_min_p():
    logits = random_logits(4)
    params = [SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.2)] * 4
    assert torch.equal(Sampler()(logits, make_batch(params)).token_ids, logits.argmax(dim=-1))


def test_greedy_and_random_rows_mix_in_one_batch():
    logits = random_logits(4)
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.7, top_k=1)]
    out = Sampler()(logits, make_batch(params))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_caller_logits_are_not_modified():
    logits = random_logits(3)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0, top_k=5, top_p=0.9, min_tokens=2)] * 3
    Sampler()(logits, make_batch(params, prompts=[[1, 3]] * 3, outputs=[[4]] * 3))
    assert torch.equal(logits, before)


# ---- seeded sampling -------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible():
    steps = list(random_logits(8, seed=1) / 3)  # flatter: draws actually vary between steps
    params = SamplingParams(temperature=1.0, seed=42)
    first = sample_stream(steps, params, torch.Generator().manual_seed(42))
    second = sample_stream(steps, params, torch.Generator().manual_seed(42))
    assert first == second
    assert len(set(first)) > 1


def test_seeded_row_is_independent_of_the_rest_of_the_batch():
    logits = random_logits(1, seed=2) / 3
    alone = Sampler()(logits, make_batch([SamplingParams(seed=7)])).token_ids[0]
    crowd_logits = torch.cat([random_logits(3, seed=3), logits, random_logits(2, seed=4)])
    params = [SamplingParams(), SamplingParams(seed=1), SamplingParams(temperature=0.0),
              SamplingParams(seed=7), SamplingParams(top_k=4), SamplingParams(seed=9, top_p=0.5)]
    for trial in range(5):
        torch.manual_seed(trial)  # the unseeded rows' draws must not matter either
        crowded = Sampler()(crowd_logits, make_batch(params)).token_ids[3]
        assert crowded == alone


def test_a_seeded_step_consumes_exactly_one_vocab_sized_exponential_draw():
    g = torch.Generator().manual_seed(5)
    batch = SamplingBatch([SamplingParams(seed=5)], [[]], [[]], [g], frozenset())
    Sampler()(random_logits(1), batch)
    reference = torch.Generator().manual_seed(5)
    torch.empty(V).exponential_(generator=reference)
    assert torch.equal(g.get_state(), reference.get_state())


def test_greedy_rows_do_not_consume_their_generator():
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    Sampler()(random_logits(1), SamplingBatch([SamplingParams(temperature=0.0, seed=5)], [[]], [[]], [g], frozenset()))
    assert torch.equal(g.get_state(), state)


def test_advance_generator_resumes_a_stream_sampled_elsewhere():
    steps = list(random_logits(6, seed=6) / 3)
    params = SamplingParams(seed=11)
    whole = sample_stream(steps, params, torch.Generator().manual_seed(11))
    resumed_gen = torch.Generator().manual_seed(11)
    advance_generator(resumed_gen, V, 4)  # four tokens were sampled on another instance
    assert sample_stream(steps[4:], params, resumed_gen) == whole[4:]


# ---- the distribution and its filters -------------------------------------------------------------


def test_samples_follow_softmax_of_logits_over_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 40_000
    out = Sampler()(logits.expand(n, 4), make_batch([SamplingParams(temperature=0.5)] * n))
    freq = torch.bincount(out.token_ids, minlength=4).float() / n
    assert torch.allclose(freq, torch.softmax(logits / 0.5, dim=0), atol=0.01)


def test_top_k_1_equals_greedy():
    logits = random_logits(16, seed=8)
    out = Sampler()(logits, make_batch([SamplingParams(temperature=2.0, top_k=1)] * 16))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_tiny_top_p_equals_greedy():
    logits = random_logits(16, seed=9)
    out = Sampler()(logits, make_batch([SamplingParams(temperature=2.0, top_p=1e-6)] * 16))
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def test_top_k_samples_only_and_all_of_the_k_most_likely_tokens():
    logits = random_logits(1, seed=10) / 10  # nearly flat, so every kept token shows up
    n = 4000
    out = Sampler()(logits.expand(n, V), make_batch([SamplingParams(top_k=5)] * n))
    assert set(out.token_ids.tolist()) == set(logits[0].topk(5).indices.tolist())


def test_min_p_removes_tokens_below_min_p_times_the_top_probability():
    logits = torch.log(torch.tensor([0.40, 0.30, 0.15, 0.10, 0.05]))
    n = 4000
    out = Sampler()(logits.expand(n, 5), make_batch([SamplingParams(min_p=0.3)] * n))
    assert set(out.token_ids.tolist()) == {0, 1, 2}  # 0.15 >= 0.3 * 0.40 > 0.10


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]] * 3))
    kept = apply_top_k_top_p_min_p(logits, top_p=torch.tensor([0.4, 0.75, 0.85]))
    assert torch.isfinite(kept).tolist() == [
        [False, True, False, False],
        [False, True, False, True],
        [False, True, True, True],
    ]


def test_top_p_applies_to_the_distribution_left_by_top_k():
    # After top_k=2 the kept probabilities renormalise to 0.625 / 0.375, so top_p=0.6 keeps one token.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    kept = apply_top_k_top_p_min_p(logits, top_k=torch.tensor([2.0]), top_p=torch.tensor([0.6]), max_top_k=2)
    assert torch.isfinite(kept).tolist() == [[True, False, False]]


def test_filters_are_per_row():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]] * 3))
    kept = apply_top_k_top_p_min_p(logits, top_k=torch.tensor([1.0, 3.0, 3.0]), top_p=torch.tensor([1.0, 0.7, 1.0]),
                                   min_p=torch.tensor([0.0, 0.0, 0.5]), max_top_k=3)
    assert torch.isfinite(kept).tolist() == [[True, False, False], [True, True, False], [True, True, False]]


def test_top_k_and_min_p_without_top_p_skip_the_sort_and_agree_with_it():
    logits = random_logits(8, seed=15)
    top_k = torch.tensor([1.0, 3, 7, V, V, 5, V, 2])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.2, 0.01, 0.1, 0.0, 0.5])
    without_sort = apply_top_k_top_p_min_p(logits, top_k=top_k, min_p=min_p, max_top_k=7)
    with_sort = apply_top_k_top_p_min_p(logits, top_k=top_k, top_p=torch.ones(8), min_p=min_p, max_top_k=7)
    assert torch.equal(without_sort, with_sort)
    assert torch.isfinite(without_sort).sum(dim=1)[:3].tolist() == [1, 3, 7]


# ---- penalties and min_tokens (the processed logits, against hand-computed references) ------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 3.0]])
    batch = make_batch([SamplingParams(repetition_penalty=2.0)], prompts=[[0, 1]], outputs=[[2, 2]])
    # token 0 (prompt, +) / 2; token 1 (prompt, -) * 2; token 2 (output, +) / 2 once; 3, 4 unseen.
    expected = torch.tensor([[1.0, -4.0, 0.5, -1.0, 3.0]])
    assert torch.equal(process_logits(logits.clone(), batch), expected)


def test_frequency_and_presence_penalties_follow_the_openai_formula():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    batch = make_batch([SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)],
                       prompts=[[3, 3, 3]], outputs=[[0, 1, 1, 1]])
    # logit -= 0.5 * count + 0.25 * (count > 0); prompt tokens do not count.
    expected = torch.tensor([[1.0 - 0.5 - 0.25, 1.0 - 1.5 - 0.25, 1.0, 1.0]])
    assert torch.allclose(process_logits(logits.clone(), batch), expected)


def test_repetition_penalty_is_applied_before_frequency_and_presence():
    logits = torch.tensor([[4.0, -4.0]])
    batch = make_batch([SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=1.0)],
                       outputs=[[0, 1]])
    expected = torch.tensor([[4.0 / 2 - 1 - 1, -4.0 * 2 - 1 - 1]])
    assert torch.equal(process_logits(logits.clone(), batch), expected)


def test_penalties_only_touch_their_own_row():
    logits = torch.ones(3, 4)
    params = [SamplingParams(), SamplingParams(repetition_penalty=2.0, presence_penalty=1.0), SamplingParams()]
    batch = make_batch(params, prompts=[[0, 1]] * 3, outputs=[[2]] * 3)
    expected = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.5, 0.5, -0.5, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert torch.equal(process_logits(logits.clone(), batch), expected)


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    batch = make_batch([SamplingParams(temperature=0.0, repetition_penalty=2.0)], outputs=[[0]])
    assert Sampler()(logits, batch).token_ids.tolist() == [1]


def test_min_tokens_suppresses_eos_and_stop_token_ids_until_reached():
    params = SamplingParams(min_tokens=3, stop_token_ids=[5])
    logits = torch.zeros(2, 8)
    batch = make_batch([params, params], outputs=[[1, 1], [1, 1, 1]])
    processed = process_logits(logits, batch)
    assert torch.isinf(processed[0]).nonzero().flatten().tolist() == [EOS, 5]
    assert torch.isfinite(processed[1]).all()  # three outputs: min_tokens reached


def test_min_tokens_with_ignore_eos_still_suppresses_stop_token_ids():
    params = SamplingParams(min_tokens=3, stop_token_ids=[5, 999], ignore_eos=True)  # 999: outside the vocab
    processed = process_logits(torch.zeros(1, 8), make_batch([params]))
    assert torch.isinf(processed[0]).nonzero().flatten().tolist() == [5]


def test_min_tokens_keeps_greedy_off_eos():
    logits = torch.tensor([[0.0, 0.0, 9.0, 1.0]])
    batch = make_batch([SamplingParams(temperature=0.0, min_tokens=1)])
    assert Sampler()(logits, batch).token_ids.tolist() == [3]


# ---- logprobs -------------------------------------------------------------------------------------


def test_no_logprobs_unless_a_row_asks():
    out = Sampler()(random_logits(2), make_batch([SamplingParams()] * 2))
    assert out.logprobs is None and out.top_logprobs is None


def test_logprobs_are_the_raw_log_softmax_not_the_processed_distribution():
    logits = random_logits(3, seed=12)
    params = [SamplingParams(temperature=0.3, top_k=3, repetition_penalty=1.7, logprobs=2)] * 3
    out = Sampler()(logits, make_batch(params, prompts=[[0, 1, 2]] * 3))
    raw = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids.unsqueeze(1)).squeeze(1))
    assert out.logprobs.dtype == torch.float32


def test_top_logprobs_are_sorted_and_sized_by_the_largest_request():
    logits = random_logits(2, seed=13)
    params = [SamplingParams(temperature=0.0, logprobs=1), SamplingParams(temperature=0.0, logprobs=4)]
    ids, values = Sampler()(logits, make_batch(params)).top_logprobs
    ref = torch.log_softmax(logits, dim=-1).topk(4, dim=-1)
    assert ids.shape == values.shape == (2, 4)
    assert torch.equal(ids, ref.indices) and torch.allclose(values, ref.values)
    assert (values[:, :-1] >= values[:, 1:]).all()


def test_logprobs_zero_gives_the_sampled_token_only():
    out = Sampler()(random_logits(1), make_batch([SamplingParams(temperature=0.0, logprobs=0)]))
    assert out.logprobs.shape == (1,) and out.top_logprobs[0].shape == (1, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_are_sampled_in_float32(dtype):
    logits = random_logits(4, seed=14).to(dtype)
    out = Sampler()(logits, make_batch([SamplingParams(temperature=0.0, logprobs=1)] * 4))
    assert torch.equal(out.token_ids, logits.float().argmax(dim=-1))
    assert out.logprobs.dtype == torch.float32
