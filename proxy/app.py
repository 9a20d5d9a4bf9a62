"""The FastAPI application: routes, API-key check, and the life cycle of the engine connections."""

from __future__ import annotations

import contextlib
import hmac
import logging
import time

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.adaptive import AdaptivePrefill
from proxy.config import ProxyConfig
from proxy.discovery import InstanceFileWatcher
from proxy.engine_client import EngineClient
from proxy.errors import OpenAIError, install_error_handlers
from proxy.limits import LimitsMiddleware
from proxy.metrics import ProxyMetrics
from proxy.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from proxy.router import Router
from proxy.serving import Serving

logger = logging.getLogger(__name__)


def load_tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def create_app(config: ProxyConfig, tokenizer=None) -> FastAPI:
    """The proxy app; engine connections open on startup. ``tokenizer`` overrides loading one."""
    if tokenizer is None:
        if not config.tokenizer_dir:
            raise ValueError("ProxyConfig.tokenizer_dir is required (the proxy tokenizes itself)")
        tokenizer = load_tokenizer(config.tokenizer_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        router = Router(config)  # gRPC channels bind to the serving event loop
        metrics = ProxyMetrics(config.default_model, router)
        app.state.router, app.state.metrics = router, metrics
        engines = EngineClient(config, router, AdaptivePrefill(config.disaggregation, router, metrics.registry))
        app.state.serving = Serving(config, tokenizer, router, engines, metrics)
        await router.start()
        watcher = InstanceFileWatcher(config.instances_file, router, health_timeout_s=config.health_timeout_s) \
            if config.instances_file else None
        if watcher is not None:
            await watcher.start()
        logger.info("proxy ready: prefill %s, decode %s, colocated %s", config.prefill_addrs,
                    config.decode_addrs, config.colocated_addrs)
        try:
            yield
        finally:
            if watcher is not None:
                await watcher.stop()
            await router.stop()

    app = FastAPI(title="kvfabric", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.tokenizer = tokenizer
    app.state.was_ready = False
    install_error_handlers(app)
    # Added first, so it runs inside the API-key check: an unauthenticated request takes no slot.
    app.add_middleware(LimitsMiddleware, limits=config.limits)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)
    v1 = APIRouter(prefix="/v1")

    @v1.get("/models")
    async def models() -> dict:
        if serving_status() == "unavailable":  # orchestrators and `vllm bench serve` poll this for readiness
            raise OpenAIError(503, "the engines are not ready yet (see /health)", code="service_unavailable")
        max_len = app.state.serving.max_model_len
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": int(started), "owned_by": "kvfabric", "root": name,
             "max_model_len": max_len} for name in config.served_model_names]}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await app.state.serving.completions(body, raw)

    @v1.post("/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request) -> Response:
        return await app.state.serving.chat(body, raw)

    app.include_router(v1)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        return app.state.serving.tokenize(body)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        return app.state.serving.detokenize(body)

    def serving_status() -> str:
        """"ok" once a complete path is healthy; "degraded" while, after that, a decode instance alone
        still serves (it recomputes prompts); "unavailable" otherwise, and until start-up is done."""
        router: Router = app.state.router
        if router.ready():
            app.state.was_ready = True
            return "ok"
        return "degraded" if router.can_serve() and app.state.was_ready else "unavailable"

    @app.get("/health")
    async def health() -> Response:
        router: Router = app.state.router
        status = serving_status()
        body = {"status": status, "routing_policy": router.policy,
                "instances": [_instance_state(i, router) for i in router.instances]}
        return JSONResponse(body, status_code=503 if status == "unavailable" else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    started = time.time()
    return app


def _instance_state(inst, router: Router) -> dict:
    h = inst.last_health
    out = {"address": inst.address, "role": inst.role, "state": inst.state, "healthy": inst.healthy,
           "in_flight": inst.in_flight}
    if h is not None:
        out.update(num_running=h.num_running, num_waiting=h.num_waiting, kv_cache_usage=h.kv_cache_usage)
    if router.events is not None:
        out["cached_blocks"] = router.events.index.num_blocks(inst.address)
    if inst.last_error:
        out["error"] = inst.last_error
    return out


class APIKeyMiddleware:
    """Every /v1 route needs ``Authorization: Bearer <key>``; checked before the body is even parsed."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), self.key):
                error = OpenAIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                    code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
