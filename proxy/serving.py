"""From a validated OpenAI request to a response: tokenize, check lengths, drive the engine stream.

A streaming request waits for its first token before answering, so an engine's refusal (or no
instance at all) is still a proper HTTP error; after that, a failure becomes an ``error`` event
in the stream followed by ``[DONE]``, as vLLM does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from proxy.config import ProxyConfig
from proxy.engine_client import EngineClient, EngineRequest, RequestRoute
from proxy.errors import OpenAIError, bad_request
from proxy.limits import admit_prompt
from proxy.metrics import ProxyMetrics, RequestTimer
from proxy.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
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
        echo = self._echo_text(req, prompt_ids) if req.echo else ""
        return await self._run(req, raw, shape, prompt_ids,
                               [req.sampling_params(max_tokens, req.logprobs, i) for i in range(req.n)], echo)

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        model = self.resolve_model(req.model)
        req.check_supported()
        prompt_ids = self._chat_prompt(req)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._max_tokens(len(prompt_ids), req.requested_max_tokens(), param, "messages")
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        shape = ResponseShape(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model, chat=True,
                              logprobs=top_n, tokenizer=self.tokenizer)
        return await self._run(req, raw, shape, prompt_ids,
                               [req.sampling_params(max_tokens, top_n, i) for i in range(req.n)])

    def _echo_text(self, req: CompletionRequest, prompt_ids: list[int]) -> str:
        prompt = req.prompt[0] if isinstance(req.prompt, list) and isinstance(req.prompt[0], (str, list)) \
            else req.prompt
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.decode(prompt_ids, skip_special_tokens=req.skip_special_tokens)

    # ---- /tokenize and /detokenize (vLLM's shapes) ------------------------------------------------

    def tokenize(self, req: TokenizeRequest) -> dict:
        self.resolve_model(req.model)
        if req.messages is not None:
            ids = self._chat_prompt(req.as_chat())
            if req.add_special_tokens:  # the template placed them; vLLM's flag adds BOS on top
                ids = list(self.tokenizer.build_inputs_with_special_tokens(ids))
        else:
            ids = list(self.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens)["input_ids"])
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids,
                "token_strs": self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None}

    def detokenize(self, req: DetokenizeRequest) -> dict:
        self.resolve_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise bad_request(f"token id {bad[0]} is out of range [0, {self.vocab_size})", param="tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

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

    async def _run(self, req, raw: Request, shape: ResponseShape, prompt_ids: list[int], params: list,
                   echo: str = "") -> Response:
        """``params``: one SamplingParams per choice (n of them); ``echo``: text put before each choice's."""
        admit_prompt(raw, len(prompt_ids) * len(params))  # a 429 when the queued-token budget is spent
        session = raw.headers.get(self.config.session_header) or req.user
        routes = [RequestRoute() for _ in params]
        ids = [shape.id] if len(params) == 1 else [f"{shape.id}-{i}" for i in range(len(params))]
        streams = [self.engines.stream(EngineRequest(rid, prompt_ids, p, session=session), route)
                   for rid, p, route in zip(ids, params, routes)]
        stream = streams[0] if len(streams) == 1 else _merged(streams)
        timer = self.metrics.start(len(prompt_ids), routes[0])
        try:
            if req.stream:
                first = await until_disconnect(raw, stream.__anext__())
                return SSEResponse(self._sse(req, shape, stream, first, len(prompt_ids), routes, timer, echo))
            return JSONResponse(await until_disconnect(raw, self._collect(shape, stream, len(params), len(prompt_ids),
                                                                          routes, timer, echo)))
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

    async def _collect(self, shape, stream, n: int, num_prompt: int, routes: list[RequestRoute],
                       timer: RequestTimer, echo: str) -> dict:
        ids = [[] for _ in range(n)]
        text = [[echo] for _ in range(n)]
        entries = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        async for d in stream:
            i = d.index
            timer.on_tokens(len(d.token_ids))
            ids[i] += d.token_ids
            text[i].append(d.text)
            entries[i] += d.logprobs
            finish[i] = d.finish_reason or finish[i]
        timer.finish(finish[0])
        choices = [shape.for_choice(i).choice("".join(text[i]), ids[i], entries[i], finish[i]) for i in range(n)]
        return shape.whole(choices, usage(num_prompt, sum(map(len, ids)), routes[0].num_cached_tokens))

    async def _sse(self, req, shape: ResponseShape, stream, first, num_prompt: int, routes: list[RequestRoute],
                   timer: RequestTimer, echo: str):
        include_usage = req.include_usage
        n = req.n
        shapes = [shape.for_choice(i) for i in range(n)]
        num_out, pending_finish = 0, n
        extra = {"usage": None} if include_usage else {}
        try:
            if shape.chat:  # OpenAI's first chat chunk carries the role alone
                for s in shapes:
                    yield event({**s.chunk("", [], [], None, first=True), **extra})
            elif echo:
                for s in shapes:
                    yield event({**s.chunk(echo, [], [], None), **extra})
            delta = first
            while delta is not None:
                s = shapes[delta.index]
                timer.on_tokens(len(delta.token_ids))
                num_out += len(delta.token_ids)
                if delta.text or delta.token_ids or delta.finish_reason:
                    yield event({**s.chunk(delta.text, delta.token_ids, delta.logprobs, delta.finish_reason),
                                 **extra})
                if delta.finish_reason:
                    pending_finish -= 1
                    if not pending_finish:
                        timer.finish(delta.finish_reason)
                        break
                delta = await anext(stream, None)
            if include_usage:
                yield event(shape.usage_chunk(usage(num_prompt, num_out, routes[0].num_cached_tokens)))
        except OpenAIError as e:
            logger.warning("request %s failed mid-stream: %s", shape.id, e.message)
            timer.finish(None, e.status)
            yield event(e.body())
        finally:
            timer.finish(None, 499)  # no-op unless the client left
            await stream.aclose()
        yield DONE


async def _merged(streams: list) -> AsyncIterator:
    """The n choices' deltas as they come, each tagged with its ``index``; the first failure ends all."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream) -> None:
        try:
            async for d in stream:
                d.index = i
                await queue.put(d)
        except BaseException as e:  # handed to the consumer, which raises it
            await queue.put(e)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)


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
