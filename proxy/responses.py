"""The OpenAI response bodies: completions and chat, whole and as stream chunks, usage, logprobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protos import kvfabric_pb2 as pb


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass
class ResponseShape:
    """What every body of one request shares."""

    id: str
    created: int
    model: str
    chat: bool
    logprobs: int | None  # top-n to report; None: no logprobs
    tokenizer: Any
    text_offset: int = 0  # completions: where the next chunk's text starts
    index: int = 0  # which of the request's n choices this shape writes
    _token_cache: dict[int, str] = field(default_factory=dict)

    @property
    def object(self) -> str:
        return ("chat.completion" if self.chat else "text_completion")

    def chunk(self, text: str, token_ids: list[int], entries: list[pb.TokenLogprob], finish_reason: str | None,
              first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            if finish_reason and not text and not first:
                delta = {}
            choice = {"index": self.index, "delta": delta, "logprobs": self._logprobs(token_ids, entries, text),
                      "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": self.index, "text": text, "logprobs": self._logprobs(token_ids, entries, text),
                      "finish_reason": finish_reason, "stop_reason": None}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def usage_chunk(self, body_usage: dict[str, Any]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [],
                "usage": body_usage}

    def for_choice(self, index: int) -> "ResponseShape":
        """The same response's writer for choice ``index`` (its own text offsets)."""
        return ResponseShape(self.id, self.created, self.model, self.chat, self.logprobs, self.tokenizer,
                             index=index)

    def choice(self, text: str, token_ids: list[int], entries: list[pb.TokenLogprob],
               finish_reason: str | None) -> dict[str, Any]:
        self.text_offset = 0
        logprobs = self._logprobs(token_ids, entries, text)
        if self.chat:
            return {"index": self.index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                "stop_reason": None}

    def whole(self, choices: list[dict[str, Any]], body_usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, "usage": body_usage}

    # ---- logprobs --------------------------------------------------------------------------------

    def _token(self, token_id: int) -> str:
        if token_id not in self._token_cache:
            self._token_cache[token_id] = self.tokenizer.decode([token_id])
        return self._token_cache[token_id]

    def _logprobs(self, token_ids: list[int], entries: list[pb.TokenLogprob], text: str) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        # entries[i] is token_ids[i]'s; the sampled id comes from token_ids (robust to a server
        # leaving TokenLogprob.token_id unset).
        pairs = list(zip(token_ids, entries))
        if self.chat:
            content = []
            for tid, e in pairs:
                tok = self._token(tid)
                top = [{"token": self._token(t.token_id), "logprob": t.logprob,
                        "bytes": list(self._token(t.token_id).encode())} for t in e.top[:self.logprobs]]
                content.append({"token": tok, "logprob": e.logprob, "bytes": list(tok.encode()), "top_logprobs": top})
            return {"content": content}
        tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
        for tid, e in pairs:
            tok = self._token(tid)
            tokens.append(tok)
            token_logprobs.append(e.logprob)
            top = {self._token(t.token_id): t.logprob for t in e.top[:self.logprobs]}
            top.setdefault(tok, e.logprob)
            top_logprobs.append(top)
            offsets.append(self.text_offset)
            self.text_offset += len(tok)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": offsets}
