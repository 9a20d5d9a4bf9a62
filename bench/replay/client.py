"""Open-loop replay against an OpenAI-compatible completions endpoint, timing every chunk.

Requests leave at their scheduled times whether or not earlier ones have finished (open loop:
a slow server builds a queue, as under real traffic); ``max_concurrency`` optionally caps the
number in flight, and the wait for a slot is recorded apart from the latency. Every request
streams, so the arrival of each chunk is timed: TTFT is first chunk minus send, ITL the gaps
between chunks. A failing server (HTTP error status, refused or reset connection, a stream cut
short, a timeout) is written into that request's record as an error kind; the replay goes on.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

from bench.replay.progress import Progress
from bench.replay.prompts import Prompt
from bench.replay.traces import TraceRequest


@dataclass
class ScheduledRequest:
    send_at_s: float          # from the start of the run
    index: int                # in the whole trace: the prompt's identity
    request: TraceRequest


@dataclass
class RequestRecord:
    index: int
    input_len: int
    output_len: int           # requested (max_tokens, with ignore_eos)
    scheduled_s: float
    sent_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0    # server's usage.completion_tokens, else the number of chunks
    prompt_tokens: int | None = None
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None
    error_detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        out = asdict(self)
        out["itl_s"] = [round(x, 6) for x in self.itl_s]
        return out


@dataclass
class ClientConfig:
    endpoint: str
    model: str
    api_key: str | None = None
    max_concurrency: int | None = None
    request_timeout_s: float = 600.0
    temperature: float = 0.0
    progress: bool = True

    @property
    def base_url(self) -> str:
        base = self.endpoint.rstrip("/")
        return base[:-3] if base.endswith("/v1") else base

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def make_http_client(cfg: ClientConfig) -> httpx.AsyncClient:
    # httpx caps a pool at 100 connections by default, which would silently close the loop.
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
    timeout = httpx.Timeout(cfg.request_timeout_s, connect=10.0)
    return httpx.AsyncClient(limits=limits, timeout=timeout, headers=cfg.headers(), trust_env=False)


def build_schedule(requests: list[TraceRequest], start: int = 0, num_requests: int | None = None,
                   time_scale: float = 1.0, rate: float | None = None, seed: int = 0) -> list[ScheduledRequest]:
    """The slice ``[start, start+num_requests)`` with send times: the trace's own arrivals
    (relative to the slice's first, times ``time_scale``), or Poisson at ``rate`` req/s."""
    chosen = requests[start: None if num_requests is None else start + num_requests]
    if not chosen:
        return []
    if rate is not None:
        if rate <= 0:
            raise ValueError("--rate must be positive")
        gaps = np.random.default_rng(seed).exponential(1.0 / rate, len(chosen))
        gaps[0] = 0.0
        times = np.cumsum(gaps).tolist()
    else:
        t0 = chosen[0].arrival_s
        times = [(r.arrival_s - t0) * time_scale for r in chosen]
    return [ScheduledRequest(t, start + i, r) for i, (t, r) in enumerate(zip(times, chosen))]


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "connect_error"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
        return "connection_lost"
    if isinstance(exc, json.JSONDecodeError):
        return "bad_response"
    if isinstance(exc, httpx.HTTPError):
        return "http_error"
    return f"client_error:{type(exc).__name__}"


async def send_request(client: httpx.AsyncClient, cfg: ClientConfig, prompt: Prompt,
                       record: RequestRecord, t0: float) -> RequestRecord:
    body = {"model": cfg.model, "prompt": prompt.text if prompt.text is not None else prompt.token_ids,
            "max_tokens": prompt.output_len, "ignore_eos": True, "temperature": cfg.temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    record.sent_s = sent - t0
    chunks, last, done = 0, sent, False
    try:
        async with client.stream("POST", cfg.base_url + "/v1/completions", json=body) as resp:
            if resp.status_code >= 400:
                detail = (await resp.aread()).decode("utf-8", "replace")[:300]
                record.error, record.error_detail = f"http_{resp.status_code}", detail
                return record
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                data = json.loads(payload)
                if data.get("error"):
                    record.error, record.error_detail = "stream_error", str(data["error"])[:300]
                    return record
                if data.get("choices"):
                    now = time.perf_counter()
                    if chunks == 0:
                        record.ttft_s = now - sent
                    else:
                        record.itl_s.append(now - last)
                    last, chunks = now, chunks + 1
                if data.get("usage"):
                    record.prompt_tokens = data["usage"].get("prompt_tokens")
                    record.output_tokens = data["usage"].get("completion_tokens") or 0
        if not done:
            record.error, record.error_detail = "incomplete_stream", f"stream ended after {chunks} chunks without [DONE]"
        elif chunks == 0:
            record.error, record.error_detail = "empty_stream", "no chunk with choices before [DONE]"
        else:
            record.e2e_s = last - sent
            record.output_tokens = record.output_tokens or chunks
    except Exception as exc:  # noqa: BLE001 - every failure becomes a record, never a crash
        record.error, record.error_detail = _error_kind(exc), f"{type(exc).__name__}: {exc}"[:300]
    return record


async def run_schedule(schedule: list[ScheduledRequest], build_prompt, cfg: ClientConfig,
                       duration_s: float | None = None, label: str = "replay") -> tuple[list[RequestRecord], float]:
    """Send every scheduled request (those due after ``duration_s`` are not sent) and wait for
    all of them. Returns the records in schedule order and the wall time of the run."""
    due = [s for s in schedule if duration_s is None or s.send_at_s <= duration_s]
    progress = Progress(len(due), label, cfg.progress)
    slots = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    records: list[RequestRecord] = []

    async with make_http_client(cfg) as client:
        t0 = time.perf_counter()

        async def one(item: ScheduledRequest, record: RequestRecord) -> None:
            prompt = build_prompt(item.request, item.index)
            record.input_len, record.output_len = prompt.input_len, prompt.output_len
            if slots:
                await slots.acquire()
            progress.started()
            try:
                await send_request(client, cfg, prompt, record, t0)
            finally:
                if slots:
                    slots.release()
                progress.finished(record.ok)

        tasks = []
        for item in due:
            delay = item.send_at_s - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            record = RequestRecord(item.index, item.request.input_len, item.request.output_len, item.send_at_s)
            records.append(record)
            tasks.append(asyncio.create_task(one(item, record)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    progress.close()
    return records, wall


WARMUP_INDEX_BASE = 1 << 40  # warm-up prompts' tails are seeded apart from every trace request


async def run_warmup(schedule: list[ScheduledRequest], build_prompt, cfg: ClientConfig,
                     n: int) -> list[RequestRecord]:
    """``n`` requests shaped like the first ones of the schedule but with unique tokens (no hash
    ids), so they warm the server without pre-filling its prefix cache for the timed run."""
    if n <= 0 or not schedule:
        return []
    shaped = [schedule[i % len(schedule)].request for i in range(n)]
    warm = [ScheduledRequest(0.0, WARMUP_INDEX_BASE + i, TraceRequest(0.0, r.input_len, r.output_len))
            for i, r in enumerate(shaped)]
    quiet = ClientConfig(**{**asdict(cfg), "progress": False,
                            "max_concurrency": min(n, cfg.max_concurrency or n)})
    records, _ = await run_schedule(warm, build_prompt, quiet, label="warm-up")
    return records


async def get_text(cfg: ClientConfig, path: str) -> str | None:
    """GET ``path`` on the endpoint; None when it is unreachable or answers an error."""
    try:
        async with make_http_client(cfg) as client:
            resp = await client.get(cfg.base_url + path, timeout=10.0)
            return resp.text if resp.status_code == 200 else None
    except httpx.HTTPError:
        return None


async def get_json(cfg: ClientConfig, path: str) -> dict | None:
    text = await get_text(cfg, path)
    try:
        return json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return None
