"""A tiny OpenAI-compatible streaming server for benchmark tests (no model behind it).

``POST /v1/completions`` streams ``max_tokens`` chunks (one token each) after ``--ttft`` seconds,
``--itl`` apart, then a usage chunk and ``[DONE]``. It keeps a real prefix cache of token-id
blocks (``--block-size``), so ``/metrics`` reports ``kvfabric_prefix_cache_{queries,hits}_total``
that follow the prompts' actual sharing. ``GET /stub/requests`` lists what each request asked.

Failure modes for tests: ``--error-every N`` answers every Nth completion with HTTP 500;
``--die-after N`` kills the whole process (``os._exit``) partway through the Nth stream, so
that request sees its connection cut and later ones find the port closed.

Run as a process: ``python tests/openai_stub.py --port 0`` prints ``PORT <n>`` once bound;
tests use ``running_stub(*flags)``, which starts it, waits until it answers, and kills it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


def make_app(opts: argparse.Namespace) -> FastAPI:
    app = FastAPI()
    state = {"requests": 0, "errors": 0, "tokens": 0, "queries": 0, "hits": 0, "running": 0,
             "seen": set(), "log": []}

    def account_prefix(ids: list[int]) -> None:
        parent = None
        for start in range(0, len(ids) - len(ids) % opts.block_size, opts.block_size):
            key = hash((parent, tuple(ids[start:start + opts.block_size])))
            state["queries"] += 1
            state["hits"] += key in state["seen"]
            state["seen"].add(key)
            parent = key

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": opts.model, "object": "model", "owned_by": "stub"}]}

    @app.get("/metrics")
    async def metrics():
        lines = [
            "# TYPE kvfabric_requests_total counter", f"kvfabric_requests_total {state['requests']}",
            "# TYPE kvfabric_request_errors_total counter", f"kvfabric_request_errors_total {state['errors']}",
            "# TYPE kvfabric_generation_tokens_total counter", f"kvfabric_generation_tokens_total {state['tokens']}",
            "# TYPE kvfabric_prefix_cache_queries_total counter",
            f"kvfabric_prefix_cache_queries_total {state['queries']}",
            "# TYPE kvfabric_prefix_cache_hits_total counter", f"kvfabric_prefix_cache_hits_total {state['hits']}",
            "# TYPE kvfabric_running_requests gauge", f"kvfabric_running_requests {state['running']}",
            "# TYPE process_cpu_seconds_total counter", "process_cpu_seconds_total 1.0",
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.get("/stub/requests")
    async def logged():
        return state["log"]

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        state["requests"] += 1
        n = state["requests"]
        prompt = body.get("prompt")
        state["log"].append({"prompt_kind": "ids" if isinstance(prompt, list) else "text",
                             "prompt_len": len(prompt), "max_tokens": body.get("max_tokens"),
                             "ignore_eos": body.get("ignore_eos"), "stream": body.get("stream"),
                             "stream_options": body.get("stream_options"), "model": body.get("model")})
        if opts.error_every and n % opts.error_every == 0:
            state["errors"] += 1
            return JSONResponse({"error": {"message": "stub: injected failure", "code": 500}}, status_code=500)
        if isinstance(prompt, list):
            account_prefix(prompt)
        max_tokens = int(body.get("max_tokens") or 16)
        dies_here = opts.die_after and n == opts.die_after

        async def stream():
            state["running"] += 1
            try:
                await asyncio.sleep(opts.ttft)
                for i in range(max_tokens):
                    if dies_here and i == max_tokens // 2:
                        os._exit(3)
                    if i:
                        await asyncio.sleep(opts.itl)
                    chunk = {"id": f"cmpl-{n}", "object": "text_completion", "model": opts.model,
                             "choices": [{"index": 0, "text": " tok", "finish_reason":
                                          "length" if i == max_tokens - 1 else None}]}
                    state["tokens"] += 1
                    yield f"data: {json.dumps(chunk)}\n\n"
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = {"prompt_tokens": len(prompt), "completion_tokens": max_tokens,
                             "total_tokens": len(prompt) + max_tokens}
                    yield f"data: {json.dumps({'id': f'cmpl-{n}', 'choices': [], 'usage': usage})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state["running"] -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--model", default="stub-model")
    p.add_argument("--ttft", type=float, default=0.02)
    p.add_argument("--itl", type=float, default=0.005)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--error-every", type=int, default=0)
    p.add_argument("--die-after", type=int, default=0)
    opts = p.parse_args(argv)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", opts.port))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(make_app(opts), log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


@contextlib.contextmanager
def running_stub(*flags: str, startup_timeout_s: float = 20.0):
    """Start the stub in its own process; yield its base URL; kill it (if still alive) on exit."""
    import httpx

    err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall the stub
    proc = subprocess.Popen([sys.executable, __file__, "--port", "0", *flags], stdout=subprocess.PIPE,
                            stderr=err, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            proc.wait(timeout=10)
            err.seek(0)
            raise RuntimeError(f"stub did not start: {line!r} {err.read()[-2000:]}")
        url = f"http://127.0.0.1:{int(line.split()[1])}"
        deadline = time.monotonic() + startup_timeout_s
        while True:
            try:
                if httpx.get(url + "/v1/models", timeout=1.0, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"stub at {url} never answered")
            time.sleep(0.05)
        yield url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        err.close()


if __name__ == "__main__":
    sys.exit(main())
