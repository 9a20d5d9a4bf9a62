"""PrefillService: compute the prompt, sample the first token, hand its KV to the connector.

The engine request runs with max_tokens=1 and ``do_remote_decode`` set when the client wants
more than one token, so the producer connector holds the blocks for the decode instance. A
cancelled RPC aborts the request (the engine stops computing for a client that left); Abort
after a successful Prefill releases the held blocks at once.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import grpc

from engine.async_engine import AsyncEngine
from protos import kvfabric_pb2 as pb
from protos import kvfabric_pb2_grpc as pb_grpc
from protos.engine_convert import health_response, logprobs_to_proto, sampling_params_from_proto

logger = logging.getLogger(__name__)


class PrefillServicer(pb_grpc.PrefillServiceServicer):
    def __init__(self, engine: AsyncEngine, model: str) -> None:
        self.engine = engine
        self.model = model

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        try:
            params = sampling_params_from_proto(request.params)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        continues = params.max_tokens is None or params.max_tokens > 1
        first = dataclasses.replace(params, max_tokens=1, min_tokens=min(params.min_tokens, 1))
        final = None
        try:
            async for out in self.engine.generate(request.request_id, list(request.prompt_token_ids), first,
                                                  {"do_remote_decode": True} if continues else None):
                final = out
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if final is None or final.error or not final.outputs[0].token_ids:
            await context.abort(grpc.StatusCode.INTERNAL, (final and final.error) or "prefill produced no token")
        c = final.outputs[0]
        held = final.kv_transfer_params is not None
        return pb.PrefillResponse(
            request_id=request.request_id,
            first_token_id=c.token_ids[0],
            text=final.new_text,
            finish_reason="" if held else (c.finish_reason or "length"),
            kv_transfer_params_json=json.dumps(final.kv_transfer_params) if held else "",
            num_prompt_tokens=len(final.prompt_token_ids),
            num_cached_tokens=final.num_cached_tokens,
            logprobs=logprobs_to_proto(c.token_ids, c.logprobs or []),
        )

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        self.engine.abort(request.request_id)
        return pb.AbortResponse(found=True)

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        return health_response(self.engine, "prefill", self.model)
