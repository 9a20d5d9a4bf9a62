"""The OpenAI-compatible front door: HTTP/SSE in, gRPC out.

The proxy owns the OpenAI surface (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
``/health``, ``/metrics``): it validates a request, applies the chat template and tokenizes with
the model's own tokenizer, picks a prefill and a decode instance (least in-flight requests among
the healthy ones), calls Prefill, streams the first token at once, then streams the rest from
Generate. With no healthy prefill instance it falls back to one engine doing both phases.

It imports no engine code (``engine``, ``kv_connector``, ``storage_tiers``, the services): it
talks to engines only through ``protos`` over gRPC, and the engines return text deltas, so it
never detokenizes output.

One request, file by file: ``app`` (routes, auth) → ``protocol`` (request models, sampling
params) → ``serving`` (tokenize, validate lengths, drive the stream) → ``engine_client`` (Prefill
then Generate, retries, cancellation) on instances chosen by ``router``; ``responses`` shapes
OpenAI JSON, ``sse`` frames the stream, ``errors`` the error bodies, ``metrics`` what Prometheus
scrapes.
"""

from proxy.app import create_app
from proxy.config import ProxyConfig

__all__ = ["ProxyConfig", "create_app"]
