"""Conversions between the internal API's messages and engine types, for the engine services.

The proxy never imports this module (it would pull in the engine).
"""

from __future__ import annotations

import json
from typing import Any

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from protos import kvfabric_pb2 as pb


def sampling_params_from_proto(p: pb.SamplingParams) -> SamplingParams:
    """Raises ValueError (naming the field) for values the engine refuses."""
    return SamplingParams(
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k,
        min_p=p.min_p,
        seed=p.seed if p.HasField("seed") else None,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        max_tokens=p.max_tokens if p.HasField("max_tokens") else None,
        min_tokens=p.min_tokens,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        include_stop_str_in_output=p.include_stop_str_in_output,
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs if p.HasField("logprobs") else None,
        skip_special_tokens=p.skip_special_tokens if p.HasField("skip_special_tokens") else True,
    )


def logprobs_to_proto(token_ids: list[int], entries) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=t, logprob=lp, top=[pb.TopLogprob(token_id=i, logprob=v) for i, v in top])
            for t, (lp, top) in zip(token_ids, entries)]


def usage_of(out: RequestOutput) -> pb.Usage:
    return pb.Usage(prompt_tokens=len(out.prompt_token_ids), completion_tokens=len(out.outputs[0].token_ids),
                    cached_tokens=out.num_cached_tokens)


def flat_numbers(stats: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested engine/connector stats as one flat {name: number} map (Health.stats_json)."""
    flat: dict[str, float] = {}
    for key, value in stats.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_numbers(value, name + "_"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = value
    return flat


def health_response(engine, role: str, model: str, ok: bool = True) -> pb.HealthResponse:
    stats = engine.stats()
    return pb.HealthResponse(
        ok=ok, role=role, model=model, num_running=int(stats.get("num_running", 0)),
        num_waiting=int(stats.get("num_waiting", 0)), kv_cache_usage=float(stats.get("usage", 0.0)),
        stats_json=json.dumps({**flat_numbers(stats), **engine.engine.routing_info()}),
        max_model_len=engine.engine.max_model_len,
    )
