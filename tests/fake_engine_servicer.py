"""Deterministic fake prefill/decode servers for the proxy's tests (no engine, no model).

Token i of a request's output is ``fake_token(prompt, i)``; its text is ``" t<id>"``. Output stops
after ``params.max_tokens`` tokens (default 8) with finish_reason "length". Each servicer records
what it was asked, which calls were cancelled and which ids were aborted, and has knobs a test can
turn: ``down`` (every RPC fails UNAVAILABLE), ``reject`` (INVALID_ARGUMENT with that message),
``fail_after`` (Generate dies after that many chunks), ``token_delay_s`` and ``prefill_delay_s``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import grpc

from protos import kvfabric_pb2 as pb
from protos import kvfabric_pb2_grpc as pb_grpc

DEFAULT_MAX_TOKENS = 8
VOCAB = 1000


def fake_token(prompt_token_ids, i: int) -> int:
    return (sum(prompt_token_ids) + 7 * i + 1) % VOCAB


def fake_text(token_id: int) -> str:
    return f" t{token_id}"


def fake_logprobs(token_id: int, params: pb.SamplingParams) -> list[pb.TokenLogprob]:
    if not params.HasField("logprobs"):
        return []
    top = [pb.TopLogprob(token_id=(token_id + k) % VOCAB, logprob=-0.5 - k) for k in range(params.logprobs)]
    return [pb.TokenLogprob(token_id=token_id, logprob=-0.5, top=top)]


@dataclass
class Knobs:
    down: bool = False
    reject: str = ""
    token_delay_s: float = 0.0
    prefill_delay_s: float = 0.0
    fail_after: int | None = None  # Generate fails UNAVAILABLE after this many chunks
    requests: list = field(default_factory=list)  # every Prefill/Generate request received
    cancelled: list[str] = field(default_factory=list)  # request ids whose RPC the client cancelled
    aborted: list[str] = field(default_factory=list)  # request ids named by Abort
    running: int = 0

    def reset(self) -> None:
        self.down, self.reject, self.token_delay_s, self.prefill_delay_s = False, "", 0.0, 0.0
        self.fail_after = None

    async def gate(self, context) -> None:
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "fake instance is down")
        if self.reject:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.reject)

    def health(self, role: str) -> pb.HealthResponse:
        stats = {"prefix_cache_hit_rate": 0.25, "kv_bytes_transferred": 4096, "label": "not a number"}
        return pb.HealthResponse(ok=True, role=role, model="fake", num_running=self.running, num_waiting=0,
                                 kv_cache_usage=0.125, stats_json=json.dumps(stats), max_model_len=0)


def _max_tokens(params: pb.SamplingParams) -> int:
    return params.max_tokens if params.HasField("max_tokens") else DEFAULT_MAX_TOKENS


class FakePrefillServicer(pb_grpc.PrefillServiceServicer):
    def __init__(self, name: str) -> None:
        self.name, self.knobs = name, Knobs()

    async def Prefill(self, request, context):
        k = self.knobs
        await k.gate(context)
        k.requests.append(request)
        k.running += 1
        try:
            await asyncio.sleep(k.prefill_delay_s)
        except asyncio.CancelledError:
            k.cancelled.append(request.request_id)
            raise
        finally:
            k.running -= 1
        tok = fake_token(request.prompt_token_ids, 0)
        done = _max_tokens(request.params) <= 1
        kv = "" if done else json.dumps({"remote_engine_id": self.name, "remote_request_id": request.request_id})
        return pb.PrefillResponse(request_id=request.request_id, first_token_id=tok, text=fake_text(tok),
                                  finish_reason="length" if done else "", kv_transfer_params_json=kv,
                                  num_prompt_tokens=len(request.prompt_token_ids), num_cached_tokens=3,
                                  logprobs=fake_logprobs(tok, request.params))

    async def Abort(self, request, context):
        self.knobs.aborted.append(request.request_id)
        return pb.AbortResponse(found=False)

    async def Health(self, request, context):
        await self.knobs.gate(context)
        return self.knobs.health("prefill")


class FakeDecodeServicer(pb_grpc.DecodeServiceServicer):
    def __init__(self, name: str, role: str = "decode") -> None:
        self.name, self.role, self.knobs = name, role, Knobs()

    async def Generate(self, request, context):
        k = self.knobs
        await k.gate(context)
        k.requests.append(request)
        k.running += 1
        start, total = len(request.output_token_ids), _max_tokens(request.params)
        try:
            for n, i in enumerate(range(start, total)):
                await asyncio.sleep(k.token_delay_s)
                if k.fail_after is not None and n == k.fail_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "fake instance died mid-stream")
                tok = fake_token(request.prompt_token_ids, i)
                last = i == total - 1
                chunk = pb.GenerateChunk(token_ids=[tok], text=fake_text(tok),
                                         logprobs=fake_logprobs(tok, request.params),
                                         finish_reason="length" if last else "")
                if last:
                    cached = len(request.prompt_token_ids) if request.kv_transfer_params_json else 0
                    chunk.usage.CopyFrom(pb.Usage(prompt_tokens=len(request.prompt_token_ids), completion_tokens=total,
                                                  cached_tokens=cached))
                yield chunk
        except asyncio.CancelledError:
            k.cancelled.append(request.request_id)
            raise
        finally:
            k.running -= 1

    async def Abort(self, request, context):
        self.knobs.aborted.append(request.request_id)
        return pb.AbortResponse(found=False)

    async def Health(self, request, context):
        await self.knobs.gate(context)
        return self.knobs.health(self.role)


async def start_server(servicer) -> tuple[grpc.aio.Server, str]:
    """Serve one fake on an ephemeral loopback port; returns (server, "127.0.0.1:port")."""
    server = grpc.aio.server()
    if isinstance(servicer, FakePrefillServicer):
        pb_grpc.add_PrefillServiceServicer_to_server(servicer, server)
    else:
        pb_grpc.add_DecodeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"
