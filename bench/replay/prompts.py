"""Prompt synthesis that keeps a trace's prefix sharing.

Traces carry lengths and prefix-block hash ids, never text. A prompt is rebuilt block by block:
hash id ``h`` always becomes the same ``block_tokens`` token ids (drawn from a generator seeded by
``(seed, h)``), distinct ids become independent draws, and whatever the blocks do not cover is
filled with tokens unique to the request (seeded by its index in the trace). So two requests
that share leading hash ids share exactly that token prefix, on every run and every machine,
and a prefix cache on the server sees the reuse the trace recorded.

``length_scale`` shrinks or stretches every length for small models; ``block_tokens`` should
then shrink with it (the default is 512 × ``length_scale``), or a scaled prompt would be cut
inside its first block and requests that share only that block would look identical.

Prompts go out as token-id arrays by default. ``TextPrompts`` instead draws tokens from words
that tokenize to themselves, decodes, and re-encodes to check the text maps back to exactly the
intended ids; a prompt that does not is sent as ids and counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from bench.replay.traces import TRACE_BLOCK_TOKENS, TraceRequest

_BLOCK_STREAM, _TAIL_STREAM = 0, 1  # separate seed namespaces: hash blocks vs per-request tails


@dataclass(frozen=True)
class Prompt:
    index: int                  # the request's index in the whole trace
    input_len: int              # after scaling and clipping
    output_len: int
    token_ids: list[int]
    text: str | None = None     # set when sent as text that re-tokenizes to token_ids
    clipped: bool = False


def default_block_tokens(length_scale: float) -> int:
    return max(1, round(TRACE_BLOCK_TOKENS * length_scale))


class PromptBuilder:
    def __init__(self, token_pool: np.ndarray, block_tokens: int = TRACE_BLOCK_TOKENS,
                 length_scale: float = 1.0, seed: int = 0, max_model_len: int | None = None):
        if block_tokens < 1 or length_scale <= 0:
            raise ValueError("block_tokens must be >= 1 and length_scale > 0")
        if len(token_pool) < 2:
            raise ValueError("token pool needs at least two token ids")
        self.token_pool = np.asarray(token_pool, dtype=np.int64)
        self.block_tokens, self.length_scale = block_tokens, length_scale
        self.seed, self.max_model_len = seed, max_model_len

    @classmethod
    def for_vocab(cls, vocab_size: int, **kwargs) -> "PromptBuilder":
        # Low ids are special and control tokens in most vocabularies; stay clear of them.
        low = min(1000, vocab_size // 10)
        return cls(np.arange(low, vocab_size), **kwargs)

    def _draw(self, stream: int, key: int, n: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, stream, key])
        return self.token_pool[rng.integers(0, len(self.token_pool), n)]

    def block(self, hash_id: int) -> np.ndarray:
        return self._draw(_BLOCK_STREAM, hash_id, self.block_tokens)

    def lengths(self, req: TraceRequest) -> tuple[int, int, bool]:
        n_in = max(1, round(req.input_len * self.length_scale))
        n_out = max(1, round(req.output_len * self.length_scale))
        clipped = False
        if self.max_model_len and n_in + n_out > self.max_model_len:
            clipped = True
            n_out = min(n_out, self.max_model_len - 1)
            n_in = min(n_in, self.max_model_len - n_out)
        return n_in, n_out, clipped

    def token_ids(self, req: TraceRequest, index: int, n_in: int) -> list[int]:
        n_blocks = min(len(req.hash_ids), -(-n_in // self.block_tokens))
        parts = [self.block(h) for h in req.hash_ids[:n_blocks]]
        covered = n_blocks * self.block_tokens
        if covered < n_in:
            parts.append(self._draw(_TAIL_STREAM, index, n_in - covered))
        return np.concatenate(parts)[:n_in].tolist()

    def build(self, req: TraceRequest, index: int) -> Prompt:
        n_in, n_out, clipped = self.lengths(req)
        return Prompt(index, n_in, n_out, self.token_ids(req, index, n_in), clipped=clipped)

    def describe(self) -> dict:
        return {"block_tokens": self.block_tokens, "length_scale": self.length_scale, "seed": self.seed,
                "max_model_len": self.max_model_len, "token_pool_size": int(len(self.token_pool)),
                "trace_block_tokens": TRACE_BLOCK_TOKENS}


_WORD = re.compile(r" [a-z]{2,}")


def word_token_pool(tokenizer) -> np.ndarray:
    """Ids of tokens that decode to one lowercase word with a leading space and encode back to
    themselves alone: a run of them is text a pre-tokenizer splits back at the same places."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    keep = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        if _WORD.fullmatch(text) and tokenizer.encode(text, add_special_tokens=False) == [token_id]:
            keep.append(token_id)
    return np.asarray(keep, dtype=np.int64)


class TextPrompts:
    """Wraps a ``PromptBuilder`` whose pool is ``word_token_pool``; verifies every prompt."""

    def __init__(self, builder: PromptBuilder, tokenizer):
        self.builder, self.tokenizer = builder, tokenizer
        self.fallbacks = 0

    def build(self, req: TraceRequest, index: int) -> Prompt:
        prompt = self.builder.build(req, index)
        text = self.tokenizer.decode(prompt.token_ids)
        if self.tokenizer.encode(text, add_special_tokens=False) != prompt.token_ids:
            self.fallbacks += 1
            return prompt
        return Prompt(prompt.index, prompt.input_len, prompt.output_len, prompt.token_ids, text, prompt.clipped)

    def describe(self) -> dict:
        return {**self.builder.describe(), "text_fallbacks_to_ids": self.fallbacks}


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)
