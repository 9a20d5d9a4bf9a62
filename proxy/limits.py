"""Admission limits at the proxy: request body size (413), concurrent requests per API key (429),
and prompt tokens admitted but not yet answered (429).

The body and per-key limits are an ASGI middleware, so they hold before any JSON is parsed and
for the whole life of a streamed response (a stream counts until its last byte or its client
leaves). The token budget needs the tokenized prompt: ``Serving`` asks ``admit_prompt`` once it
knows the length, and the middleware gives the tokens back when the response ends, whatever way
it ends. Every refusal is an OpenAI-style error with a ``code`` naming the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from proxy.errors import OpenAIError

_SCOPE_KEY = "kvfabric.admission"


@dataclass
class Limits:
    max_body_bytes: int = 8 << 20  # 0: no limit
    max_concurrent_per_key: int = 0  # 0: no limit
    max_queued_prompt_tokens: int = 0  # 0: no limit

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_concurrent_per_key", "max_queued_prompt_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (0 means no limit)")


class _Admission:
    """What one request holds: a slot under its key and, once tokenized, its prompt tokens."""

    def __init__(self, state: "LimitsMiddleware") -> None:
        self.state, self.tokens = state, 0

    def add_prompt(self, num_tokens: int) -> None:
        limit, queued = self.state.limits.max_queued_prompt_tokens, self.state.queued_tokens
        if limit and queued + num_tokens > limit:
            raise OpenAIError(429, f"The server is at its limit of {limit} queued prompt tokens ({queued} "
                                   f"queued, this prompt has {num_tokens}); retry later.",
                              code="queued_tokens_exceeded")
        self.tokens += num_tokens
        self.state.queued_tokens += num_tokens

    def release(self) -> None:
        self.state.queued_tokens -= self.tokens
        self.tokens = 0


def admit_prompt(raw: Request, num_tokens: int) -> None:
    """Count ``num_tokens`` against the queued-token budget, or raise a 429."""
    admission = raw.scope.get(_SCOPE_KEY)
    if admission is not None:
        admission.add_prompt(num_tokens)


def _api_key(scope) -> str:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


class LimitsMiddleware:
    """Applies ``Limits`` to every POST under /v1 (the routes that run the model)."""

    def __init__(self, app, limits: Limits) -> None:
        self.app, self.limits = app, limits
        self.in_flight: dict[str, int] = {}
        self.queued_tokens = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        key = _api_key(scope)
        limit = self.limits.max_concurrent_per_key
        if limit and self.in_flight.get(key, 0) >= limit:
            await OpenAIError(429, f"Too many concurrent requests for this API key (limit {limit}); "
                                   "wait for one to finish.", code="concurrency_limit_exceeded"
                              ).response()(scope, receive, send)
            return
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        admission = _Admission(self)
        scope[_SCOPE_KEY] = admission
        try:
            receive = await self._bounded_body(scope, receive, send)
            if receive is not None:
                await self.app(scope, receive, send)
        finally:
            admission.release()
            self.in_flight[key] -= 1
            if not self.in_flight[key]:
                del self.in_flight[key]

    async def _bounded_body(self, scope, receive, send):
        """Read the whole body (it is small JSON) within the limit, and hand the app a replay of it;
        None when the body was too large and the 413 has been sent."""
        limit = self.limits.max_body_bytes
        too_large = OpenAIError(413, f"The request body is larger than the limit of {limit} bytes.",
                                code="request_too_large")
        for name, value in scope["headers"]:
            if name == b"content-length" and limit and value.isdigit() and int(value) > limit:
                await too_large.response()(scope, receive, send)
                return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if limit and size > limit:
                await too_large.response()(scope, receive, send)
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect, as the app expects

        return replay
