"""From a validated OpenAI request to a response: tokenize, check lengths, drive the engine stream.

A streaming request waits for its first token before answering, so an engine's refusal (or no
instance at all) is still a proper HTTP error; after that, a failure becomes an ``error`` event
in the stream followed by ``[DONE]``, as vLLM does.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from proxy.config import ProxyConfig
from proxy.engine_client import EngineClient, EngineRequest, RequestRoute
from proxy.errors import OpenAIError, bad_request
from proxy.limits import admit_prompt
from proxy.metrics import ProxyMetrics, RequestTimer
from proxy.protocol import ChatCompletionRequest, CompletionRequest
from proxy.responses import ResponseShape, usage
from proxy.router import Router
from proxy.sse import DONE, ClientDisconnected, SSEResponse, event, until_disconnect

logger = logging.getLogger(__name__)


class Serving:
    def __init__(self, config: ProxyConfig, tokenizer: Any, router: Router, engines: EngineClient,
                 metrics: ProxyMetrics) -> None:
        self.config, self.tokenizer, self.router = config, tokenizer, router
        self.engines, self.metrics = engines, metrics
        self.vocab_size = len(tokenizer)
        self._model_config_len = _model_config_max_len(config.tokenizer_dir)

    @property
    def max_model_len(self) -> int | None:
        return self.config.max_model_len or self.router.max_model_len() or self._model_config_len

    def resolve_model(self, name: str | None) -> str:
        if name is None:
            return self.config.default_model
        if name not in self.config.served_model_names:
            raise OpenAIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return name

    # ---- endpoints -------------------------------------------------------------------------------

    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        model = self.resolve_model(req.model)
        req.check_supported()
        prompt_ids = self._completion_prompt(req)
        max_tokens = self._max_tokens(len(prompt_ids), req.max_tokens, "max_tokens", "prompt")
        shape = ResponseShape(f"cmpl-{uuid.uuid4().hex}", int(time.time()), model, chat=False,
                              logprobs=req.logprobs, tokenizer=self.tokenizer)
        return await self._run(req, raw, shape, prompt_ids, req.sampling_params(max_tokens, req.logprobs))

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        model = self.resolve_model(req.model)
        req.check_supported()
        prompt_ids = self._chat_prompt(req)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._max_tokens(len(prompt_ids), req.requested_max_tokens(), param, "messages")
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        shape = ResponseShape(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model, chat=True,
                              logprobs=top_n, tokenizer=self.tokenizer)
        return await self._run(req, raw, shape, prompt_ids, req.sampling_params(max_tokens, top_n))

    # ---- prompt and length checks ----------------------------------------------------------------

    def _completion_prompt(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt[0] if isinstance(req.prompt, list) and req.prompt and isinstance(
            req.prompt[0], (str, list)) else req.prompt
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"prompt token id {bad[0]} is out of range [0, {self.vocab_size})", param="prompt")
        return list(prompt)

    def _chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise bad_request("this model's tokenizer has no chat template; use /v1/completions", param="messages")
        conversation = req.conversation()
        try:
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False,
                                                      add_generation_prompt=req.add_generation_prompt,
                                                      **(req.chat_template_kwargs or {}))
        except Exception as e:  # jinja raises on conversations the template refuses
            raise bad_request(f"the chat template refused the messages: {e}", param="messages") from None
        # The template already placed the special tokens (BOS etc.).
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _max_tokens(self, num_prompt: int, requested: int | None, param: str, prompt_param: str) -> int:
        limit = self.max_model_len
        if requested is not None and requested < 1:
            raise bad_request(f"{param} must be at least 1, got {requested}", param=param)
        if limit is None:
            if requested is None:
                raise bad_request(f"{param} is required: the context length is unknown", param=param)
            return requested
        if num_prompt >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, your prompt is "
                              f"{num_prompt} tokens, leaving no room to generate.", param=prompt_param,
                              code="context_length_exceeded")
        if requested is None:
            return limit - num_prompt
        if num_prompt + requested > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens. However, you requested "
                              f"{num_prompt + requested} tokens ({num_prompt} in the prompt, {requested} for the "
                              f"completion). Please reduce the prompt or {param}.", param=param,
                              code="context_length_exceeded")
        return requested

    # ---- driving the stream ----------------------------------------------------------------------

    async def _run(self, req, raw: Request, shape: ResponseShape, prompt_ids: list[int], params) -> Response:
        admit_prompt(raw, len(prompt_ids))  # a 429 when the queued-token budget is spent
        route = RequestRoute()
        stream = self.engines.stream(EngineRequest(shape.id, prompt_ids, params), route)
        timer = self.metrics.start(len(prompt_ids))
        try:
            if req.stream:
                first = await until_disconnect(raw, stream.__anext__())
                return SSEResponse(self._sse(req, shape, stream, first, len(prompt_ids), route, timer))
            return JSONResponse(await until_disconnect(raw, self._collect(shape, stream, len(prompt_ids),
                                                                          route, timer)))
        except ClientDisconnected:
            timer.finish(None, 499)
            await stream.aclose()
            return Response(status_code=499)
        except OpenAIError as e:
            timer.finish(None, e.status)
            await stream.aclose()
            raise
        except BaseException:
            timer.finish(None, 500)
            await stream.aclose()
            raise

    async def _collect(self, shape, stream, num_prompt: int, route: RequestRoute, timer: RequestTimer) -> dict:
        ids, text, entries, finish = [], [], [], None
        async for d in stream:
            timer.on_tokens(len(d.token_ids))
            ids += d.token_ids
            text.append(d.text)
            entries += d.logprobs
            finish = d.finish_reason or finish
        timer.finish(finish)
        return shape.whole("".join(text), ids, entries, finish, usage(num_prompt, len(ids), route.num_cached_tokens))

    async def _sse(self, req, shape: ResponseShape, stream, first, num_prompt: int, route: RequestRoute,
                   timer: RequestTimer):
        include_usage = req.include_usage
        num_out = 0
        extra = {"usage": None} if include_usage else {}
        try:
            if shape.chat:  # OpenAI's first chat chunk carries the role alone
                yield event({**shape.chunk("", [], [], None, first=True), **extra})
            delta = first
            while delta is not None:
                timer.on_tokens(len(delta.token_ids))
                num_out += len(delta.token_ids)
                if delta.text or delta.token_ids or delta.finish_reason:
                    yield event({**shape.chunk(delta.text, delta.token_ids, delta.logprobs, delta.finish_reason),
                                 **extra})
                if delta.finish_reason:
                    timer.finish(delta.finish_reason)
                    break
                delta = await anext(stream, None)
            if include_usage:
                yield event(shape.usage_chunk(usage(num_prompt, num_out, route.num_cached_tokens)))
        except OpenAIError as e:
            logger.warning("request %s failed mid-stream: %s", shape.id, e.message)
            timer.finish(None, e.status)
            yield event(e.body())
        finally:
            timer.finish(None, 499)  # no-op unless the client left
            await stream.aclose()
        yield DONE


def _model_config_max_len(model_dir: str | None) -> int | None:
    if not model_dir:
        return None
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None
