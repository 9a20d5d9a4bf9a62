"""One request across the engines: Prefill, then Generate, as one stream of token deltas.

Failure handling, in order of preference: a client error from an engine (INVALID_ARGUMENT) is the
client's 400; an instance that fails otherwise is marked unhealthy and the step is retried on
another instance (prefill on another prefill instance, else colocated; decode on another decode
instance, else colocated, with every token streamed so far passed as ``output_token_ids`` so the
client's stream simply continues). A deadline is a 504; running out of instances a 503.

Cancellation: when the consumer of the stream goes away (the HTTP client disconnected and the
task was cancelled, or the generator was closed), the in-flight gRPC call is cancelled — the
servers abort on cancellation — and an Abort goes to every instance the request touched, as
belt and braces, and so that a producer frees KV it holds for a decode that will never come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from protos import kvfabric_pb2 as pb
from proxy.adaptive import AdaptivePrefill
from proxy.config import ProxyConfig
from proxy.errors import OpenAIError, bad_request
from proxy.instance import Instance
from proxy.router import Router

logger = logging.getLogger(__name__)

_CLIENT_ERRORS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE)
# Not the instance's fault: try elsewhere without taking it out of rotation.
_TRANSIENT = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION)


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: pb.SamplingParams
    decode_cached_tokens: int = 0  # prompt tokens decode already caches, when known (a prefix index): adaptive.py
    session: str | None = None  # a client's session or user id: the router's affinity fallback


@dataclass
class Delta:
    token_ids: list[int]
    text: str
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    index: int = 0  # which of the request's n choices (set when several are merged)


@dataclass
class RequestRoute:
    """Where a request ran, for logs and tests."""

    prefill: str | None = None
    decode: str | None = None
    num_cached_tokens: int = 0
    retries: int = 0
    prefill_decision: str = ""  # why the prompt was prefilled where it was (adaptive.py's reason)


class EngineClient:
    def __init__(self, config: ProxyConfig, router: Router, adaptive: AdaptivePrefill | None = None) -> None:
        self.config = config
        self.router = router
        self.adaptive = adaptive or AdaptivePrefill(config.disaggregation, router)
        self._background: set[asyncio.Task] = set()

    async def stream(self, req: EngineRequest, route: RequestRoute | None = None) -> AsyncIterator[Delta]:
        """Yield deltas until one carries a finish_reason; raises OpenAIError on failure."""
        route = route if route is not None else RequestRoute()
        touched: list[Instance] = []
        out_ids: list[int] = []
        out_text = ""
        kv_transfer_params_json = ""
        finished = False
        try:
            decision = self.adaptive.decide(req.prompt_token_ids, req.decode_cached_tokens)
            route.prefill_decision = decision.reason
            prefilled = await self._prefill(req, route, touched) if decision.remote else None
            if prefilled is not None:
                out_ids, out_text = [prefilled.first_token_id], prefilled.text
                kv_transfer_params_json = prefilled.kv_transfer_params_json
                route.num_cached_tokens = prefilled.num_cached_tokens
                finished = bool(prefilled.finish_reason)
                yield Delta(out_ids[:], prefilled.text, list(prefilled.logprobs), prefilled.finish_reason or None)
                if finished:
                    return
            tried: set[str] = set()
            last_error = "no healthy decode or colocated instance"
            while True:
                inst = self.router.pick_decode(True, tried, req.prompt_token_ids, req.session) \
                    if kv_transfer_params_json else None
                if inst is None:
                    kv_transfer_params_json = ""  # nobody can pull it: the next engine recomputes
                    inst = self.router.pick_decode(False, tried, req.prompt_token_ids, req.session)
                if inst is None:
                    raise OpenAIError(503, f"no instance could generate: {last_error}", code="service_unavailable")
                tried.add(inst.address)
                touched.append(inst)
                route.decode = inst.address
                greq = pb.GenerateRequest(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                                          params=req.params, output_token_ids=out_ids,
                                          kv_transfer_params_json=kv_transfer_params_json, output_text=out_text)
                call = inst.decode.Generate(greq, timeout=self.config.generate_timeout_s)
                # A prompt computed here is timed too: decode's local prefill throughput.
                local = (self.adaptive.track(inst, len(req.prompt_token_ids)) if not out_ids
                         else contextlib.nullcontext(None))
                try:
                    with self.router.track(inst), local as prefilled_here:
                        async for chunk in call:
                            if prefilled_here is not None:  # the first chunk: the prompt is done
                                prefilled_here()
                                prefilled_here = None
                            out_ids.extend(chunk.token_ids)
                            out_text += chunk.text
                            if prefilled is None and chunk.HasField("usage"):
                                route.num_cached_tokens = chunk.usage.cached_tokens
                            finished = bool(chunk.finish_reason)
                            yield Delta(list(chunk.token_ids), chunk.text, list(chunk.logprobs),
                                        chunk.finish_reason or None)
                            if finished:
                                return
                    last_error = f"{inst.address} ended the stream without a finish_reason"
                    inst.mark_unhealthy(last_error)
                except grpc.aio.AioRpcError as e:
                    last_error = self._failed(inst, e)
                finally:
                    if not call.done():
                        call.cancel()
                # The failed consumer may have claimed the producer's blocks: recompute from here.
                kv_transfer_params_json = ""
                route.retries += 1
        finally:
            if not finished:
                self._abort_soon(req.request_id, touched)

    async def _prefill(self, req: EngineRequest, route: RequestRoute,
                       touched: list[Instance]) -> pb.PrefillResponse | None:
        """The first token from a prefill instance, or None when none is healthy (colocated fallback)."""
        tried: set[str] = set()
        while (inst := self.router.pick_prefill(tried, req.prompt_token_ids, req.session)) is not None:
            tried.add(inst.address)
            touched.append(inst)
            route.prefill = inst.address
            try:
                with self.router.track(inst), self.adaptive.track(inst, len(req.prompt_token_ids)) as done:
                    resp = await inst.prefill.Prefill(
                        pb.PrefillRequest(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                                          params=req.params), timeout=self.config.prefill_timeout_s)
                    done(resp.num_cached_tokens)
                    return resp
            except grpc.aio.AioRpcError as e:
                self._failed(inst, e)
                route.retries += 1
        route.prefill = None
        return None

    def _failed(self, inst: Instance, e: grpc.aio.AioRpcError) -> str:
        """Raise what the client must see, or take note and let the caller try elsewhere."""
        code, details = e.code(), e.details() or ""
        if code in _CLIENT_ERRORS:
            raise bad_request(details or f"the engine refused the request ({code.name})")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise OpenAIError(504, f"{inst.role} instance {inst.address} timed out", code="timeout")
        reason = f"{inst.role} {inst.address}: {code.name} {details}".strip()
        if code not in _TRANSIENT:
            inst.mark_unhealthy(reason)
        logger.warning("request failed on %s; trying elsewhere", reason)
        return reason

    def _abort_soon(self, request_id: str, instances: list[Instance]) -> None:
        """Fire-and-forget: this runs while the request's task is being cancelled or closed."""
        for inst in {i.address: i for i in instances}.values():
            task = asyncio.get_running_loop().create_task(inst.abort(request_id, self.config.abort_timeout_s))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
