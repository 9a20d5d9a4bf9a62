"""The engine behind an asyncio server: one thread steps the engine, coroutines stream results.

The engine is not thread-safe, so every call into it happens on the engine thread: requests and
aborts are queued to it, and its outputs are handed back to each request's asyncio queue with
``call_soon_threadsafe``. A caller that stops iterating (its client left, its RPC was cancelled)
aborts its request, so no engine keeps computing for nobody.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    kv_transfer_params: dict[str, Any] | None
    output_token_ids: list[int] | None


class _Failed:
    def __init__(self, error: Exception) -> None:
        self.error = error


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stats: dict[str, Any] = engine.stats()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams,
        kv_transfer_params: dict[str, Any] | None = None, output_token_ids: list[int] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as they come; raises ValueError for input the engine refuses."""
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = (loop, stream)
        self._commands.put(_Add(request_id, prompt, params, kv_transfer_params, output_token_ids))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, _Failed):
                    finished = True
                    raise item.error
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stats(self) -> dict[str, Any]:
        """A snapshot taken by the engine thread (reading live engine state here would race)."""
        return dict(self._stats)

    def shutdown(self) -> None:
        self._stop.set()
        self._commands.put(("wake", None))
        self._thread.join(timeout=10)
        self.engine.shutdown()

    # ---- engine thread ---------------------------------------------------------------------------

    def _deliver(self, request_id: str, item: Any) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, stream = target
            loop.call_soon_threadsafe(stream.put_nowait, item)

    def _apply(self, cmd: Any) -> None:
        if isinstance(cmd, _Add):
            try:
                self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params, cmd.kv_transfer_params,
                                        cmd.output_token_ids)
            except ValueError as e:
                self._deliver(cmd.request_id, _Failed(e))
        elif cmd[0] == "abort":
            self.engine.abort_request(cmd[1])

    def _run(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            busy = engine.has_work()
            try:
                cmd = self._commands.get(block=not busy, timeout=None if busy else 0.05)
                self._apply(cmd)
                while True:
                    self._apply(self._commands.get_nowait())
            except queue.Empty:
                pass
            if not engine.has_work():
                self._stats = engine.stats()
                continue
            try:
                outputs = engine.step()
            except Exception:  # a bug or a device fault: fail what is in flight, keep serving
                logger.exception("engine step failed; aborting in-flight requests")
                for rid in list(engine.scheduler.requests):
                    self._deliver(rid, _Failed(RuntimeError("engine step failed")))
                engine.abort_request(list(engine.scheduler.requests))
                engine.step()
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
            self._stats = engine.stats()
            if engine.last_step_num_tokens == 0:
                engine.wait_for_work()
