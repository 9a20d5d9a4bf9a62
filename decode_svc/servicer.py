"""DecodeService: continue a request from its first token, pulling the prompt's KV, or (colocated)
compute everything. Streams one chunk per step; a cancelled stream aborts the request."""

from __future__ import annotations

import json
import logging

import grpc

from engine.async_engine import AsyncEngine
from protos import kvfabric_pb2 as pb
from protos import kvfabric_pb2_grpc as pb_grpc
from protos.engine_convert import health_response, logprobs_to_proto, sampling_params_from_proto, usage_of

logger = logging.getLogger(__name__)


class DecodeServicer(pb_grpc.DecodeServiceServicer):
    def __init__(self, engine: AsyncEngine, model: str, role: str = "decode") -> None:
        self.engine = engine
        self.model = model
        self.role = role

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            params = sampling_params_from_proto(request.params)
            kv_params = json.loads(request.kv_transfer_params_json) if request.kv_transfer_params_json else None
            if kv_params is not None and not isinstance(kv_params, dict):
                raise ValueError("kv_transfer_params_json must be a JSON object")
        except (ValueError, json.JSONDecodeError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        stream = self.engine.generate(request.request_id, list(request.prompt_token_ids), params, kv_params,
                                      list(request.output_token_ids) or None)
        try:
            async for out in stream:
                if out.error:
                    code = grpc.StatusCode.FAILED_PRECONDITION if "KV transfer" in out.error else grpc.StatusCode.INTERNAL
                    await context.abort(code, out.error)
                chunk = pb.GenerateChunk(token_ids=out.new_token_ids, text=out.new_text,
                                         logprobs=logprobs_to_proto(out.new_token_ids, out.new_logprobs))
                if out.finished:
                    chunk.finish_reason = out.outputs[0].finish_reason or "stop"
                    chunk.usage.CopyFrom(usage_of(out))
                yield chunk
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            await stream.aclose()

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        self.engine.abort(request.request_id)
        return pb.AbortResponse(found=True)

    async def Health(self, request: pb.HealthRequest, context) -> pb.HealthResponse:
        return health_response(self.engine, self.role, self.model)
