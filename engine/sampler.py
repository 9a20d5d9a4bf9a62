"""The sampler: one step's logits in, one token per request out (plus raw logprobs if asked).

Order of operations, as in vLLM V1:

1. logprobs: ``log_softmax`` of the RAW logits, before anything below touches them;
2. min_tokens: EOS (unless ``ignore_eos``) and ``stop_token_ids`` get ``-inf`` until the request
   has ``min_tokens`` output tokens;
3. penalties: repetition over prompt + output tokens (positive logits divided, negative
   multiplied), then frequency and presence over output tokens (OpenAI's formula
   ``logit -= frequency * count + presence * (count > 0)``);
4. greedy rows (``temperature < 1e-5``) take the argmax here;
5. the other rows: temperature, then top-k, top-p and min-p as one mask (one sort when a row
   uses top-p, thresholds without a sort otherwise, nothing when no row filters), then an
   exponential race ``argmax(probs / E)``, ``E ~ Exp(1)``, which is an exact draw from ``probs``.

Everything runs batched over rows; per-row parameters reach the device in one transfer and
per-token data (penalty and min_tokens indices) in one scatter each.

Random-number invariant (the engine relies on it): a row whose request has a seeded generator
and is not greedy consumes EXACTLY one ``torch.empty(vocab_size).exponential_(generator=g)`` per
step it samples, and nothing else touches ``g``. Its token therefore depends only on its seed, its
logits and how many tokens it sampled before -- never on the rest of the batch -- and a request
resumed on another instance (after a remote prefill, say) continues its stream after
``advance_generator(g, vocab_size, num_tokens_sampled_elsewhere)``. Greedy rows never read their
generator, so its position does not matter for them. Unseeded rows share one batched draw from
the device's default generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from engine.sampling_params import SamplingParams


@dataclass
class SamplingBatch:
    """One row per request that samples this step, in the order of the logits' rows."""

    params: list[SamplingParams]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]  # generated so far: for penalties and min_tokens
    generators: list[torch.Generator | None]  # a seeded request's own generator, else None
    eos_token_ids: frozenset[int]

    def __len__(self) -> int:
        return len(self.params)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [N] long
    logprobs: torch.Tensor | None  # [N] float32: raw logprob of each sampled token, if any row asked
    top_logprobs: tuple[torch.Tensor, torch.Tensor] | None  # ([N, k] ids, [N, k] float32), k = max asked


def advance_generator(g: torch.Generator, vocab_size: int, steps: int) -> None:
    """Move ``g`` past ``steps`` sampled tokens, exactly as the sampler would have.

    One call per step rather than one call of ``steps * vocab_size`` numbers: a generator's
    consumption (a CUDA Philox offset in particular) depends on the shape of each call.
    """
    for _ in range(steps):
        torch.empty(vocab_size, device=g.device).exponential_(generator=g)


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        # A float32 copy: the caller's logits stay untouched and half-precision softmaxes are avoided.
        logits = logits.to(torch.float32, copy=True)
        params = batch.params

        logprobs = top_logprobs = None
        asked = [p.logprobs for p in params if p.logprobs is not None]
        if asked:
            raw_logprobs = torch.log_softmax(logits, dim=-1)
            top_logprobs = _top_k_pairs(raw_logprobs, max(asked))

        logits = process_logits(logits, batch)

        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if not random_rows:
            token_ids = logits.argmax(dim=-1)
        elif len(random_rows) == len(params):
            token_ids = sample_random(logits, params, batch.generators)
        else:  # only the random rows pay for temperature, filters and noise
            token_ids = logits.argmax(dim=-1)
            rows = torch.tensor(random_rows, device=logits.device)
            token_ids[rows] = sample_random(
                logits[rows], [params[i] for i in random_rows], [batch.generators[i] for i in random_rows]
            )

        if asked:
            logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs, top_logprobs=top_logprobs)


def _top_k_pairs(logprobs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, ids = logprobs.topk(k, dim=-1)  # sorted, largest first
    return ids, values


# ---- logits processing (min_tokens, penalties): what greedy and random rows both see -------------


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """min_tokens suppression then penalties, in place on ``logits`` (float32, [N, V]); returned."""
    apply_min_tokens(logits, batch)
    apply_penalties(logits, batch)
    return logits


def _scatter_index(rows_tokens: list[tuple[int, list[int]]], vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index pairs for ``index_put_``, built on the host and sent in one transfer.

    The conversion from Python lists costs ~50 ns a token on the host and dominates a step with
    long penalised prompts; keeping each request's tokens as an array would remove it.
    """
    tokens = np.concatenate([np.asarray(t, dtype=np.int64) for _, t in rows_tokens] + [np.empty(0, np.int64)])
    rows = np.repeat(np.asarray([r for r, _ in rows_tokens], dtype=np.int64), [len(t) for _, t in rows_tokens])
    keep = tokens < vocab_size  # stop_token_ids may name ids beyond the model's vocabulary
    both = torch.from_numpy(np.stack([rows[keep], tokens[keep]])).to(device, non_blocking=True)
    return both[0], both[1]


def apply_min_tokens(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Until a request has ``min_tokens`` outputs, its stop tokens cannot be sampled.

    EOS is spared when ``ignore_eos`` is set: it would not stop the request anyway.
    """
    rows_tokens = [
        (i, list(p.stop_token_ids) + ([] if p.ignore_eos else list(batch.eos_token_ids)))
        for i, (p, out) in enumerate(zip(batch.params, batch.output_token_ids))
        if len(out) < p.min_tokens
    ]
    if not any(t for _, t in rows_tokens):
        return
    rows, tokens = _scatter_index(rows_tokens, logits.shape[1], logits.device)
    logits.index_put_((rows, tokens), torch.tensor(float("-inf"), device=logits.device))


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """Repetition penalty (prompt + output tokens), then frequency and presence (output tokens)."""
    params = batch.params
    num_rows, vocab_size = logits.shape
    device = logits.device

    repeat_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if repeat_rows:
        seen = torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=device)
        rows, tokens = _scatter_index(
            [(i, batch.prompt_token_ids[i]) for i in repeat_rows]
            + [(i, batch.output_token_ids[i]) for i in repeat_rows], vocab_size, device)
        seen.index_put_((rows, tokens), torch.tensor(True, device=device))
        penalty = torch.tensor([p.repetition_penalty for p in params], device=device).unsqueeze(1)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalized, logits))

    additive_rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0]
    if additive_rows:
        counts = torch.zeros(num_rows, vocab_size, dtype=torch.float32, device=device)
        rows, tokens = _scatter_index([(i, batch.output_token_ids[i]) for i in additive_rows], vocab_size, device)
        counts.index_put_((rows, tokens), torch.ones_like(rows, dtype=torch.float32), accumulate=True)
        freq_pres = torch.tensor([[p.frequency_penalty, p.presence_penalty] for p in params], device=device)
        logits -= freq_pres[:, :1] * counts + freq_pres[:, 1:] * (counts > 0)


# ---- random sampling: temperature, top-k / top-p / min-p, exponential race -----------------------


def sample_random(logits: torch.Tensor, params: list[SamplingParams],
                  generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row drawn from softmax(logits / T) restricted by top-k, top-p and min-p."""
    num_rows, vocab_size = logits.shape
    device = logits.device
    # One host-to-device transfer for every per-row scalar.
    scalars = torch.tensor([[p.temperature, p.top_k or vocab_size, p.top_p, p.min_p] for p in params],
                           dtype=torch.float32).to(device, non_blocking=True)
    logits = logits / scalars[:, 0:1]
    top_k = [p.top_k for p in params if p.top_k]
    use_top_p = any(p.top_p < 1.0 for p in params)
    use_min_p = any(p.min_p > 0.0 for p in params)
    if top_k or use_top_p or use_min_p:
        logits = apply_top_k_top_p_min_p(
            logits,
            top_k=scalars[:, 1] if top_k else None,
            top_p=scalars[:, 2] if use_top_p else None,
            min_p=scalars[:, 3] if use_min_p else None,
            max_top_k=min(max(top_k), vocab_size) if top_k else None,
        )
    probs = torch.softmax(logits, dim=-1)
    return (probs / exponential_noise(num_rows, vocab_size, generators, device)).argmax(dim=-1)


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor | None = None,
                            top_p: torch.Tensor | None = None, min_p: torch.Tensor | None = None,
                            max_top_k: int | None = None) -> torch.Tensor:
    """Mask (to -inf) what top-k, then top-p, then min-p remove; each row keeps its argmax.

    Per-row values, [N] float32 each, None where no row uses the filter: ``top_k`` (the vocabulary
    size where off), ``top_p`` (1 where off), ``min_p`` (0 where off). ``max_top_k``, the largest
    top_k in use, is given by the caller from host values so no device sync is needed to find it.

    All three keep a prefix of the tokens in descending-logit order. top-p needs that order
    itself, so one sort serves all three; without top-p, top-k is a threshold from a ``topk`` of
    only ``max_top_k`` columns (ties at the threshold are kept) and min-p a threshold from the
    maximum -- no sort. top-p uses the distribution left by top-k (as vLLM does); min-p
    (``p >= min_p * p_max``) compares logits with ``max + log(min_p)`` and cannot depend on the
    order, since renormalising does not change any ratio to p_max.
    """
    num_rows, vocab_size = logits.shape
    log_min_p = torch.log(min_p).unsqueeze(1) if min_p is not None else None  # log(0) = -inf: off
    if top_p is None:
        if top_k is not None:
            k = top_k.long().unsqueeze(1)
            max_top_k = max_top_k or vocab_size
            top_values = logits.topk(max_top_k, dim=-1).values
            kth = top_values.gather(1, k.clamp(max=max_top_k) - 1).masked_fill(k >= vocab_size, -math.inf)
            logits = logits.masked_fill(logits < kth, -math.inf)
        if log_min_p is not None:
            logits = logits.masked_fill(logits < logits.amax(dim=-1, keepdim=True) + log_min_p, -math.inf)
        return logits

    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        remove |= torch.arange(vocab_size, device=logits.device) >= top_k.unsqueeze(1)
    probs = sorted_logits.masked_fill(remove, -math.inf).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # top_p == 1 must remove nothing, even where rounding pushes the cumulative sum past 1.
    remove |= (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    if log_min_p is not None:
        remove |= sorted_logits < sorted_logits[:, :1] + log_min_p
    remove[:, 0] = False
    return logits.masked_fill(torch.empty_like(remove).scatter_(1, sorted_ids, remove), -math.inf)


def exponential_noise(num_rows: int, vocab_size: int, generators: list[torch.Generator | None],
                      device) -> torch.Tensor:
    """[N, V] Exp(1) noise: one draw per seeded row from its own generator, one batched draw for the rest.

    Clamped away from zero: ``exponential_`` can return exactly 0, and ``0 / 0`` would let a
    masked token win the race.
    """
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if not seeded:
        noise = torch.empty(num_rows, vocab_size, device=device).exponential_()
    else:
        noise = torch.empty(num_rows, vocab_size, device=device)
        for i in seeded:  # the one per-row loop: each seeded row advances only its own generator
            noise[i].exponential_(generator=generators[i])
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if unseeded:
            noise[torch.tensor(unseeded, device=device)] = torch.empty(
                len(unseeded), vocab_size, device=device).exponential_()
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)
