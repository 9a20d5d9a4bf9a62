"""Server-sent events: ``data: {json}\\n\\n`` frames, ``data: [DONE]``, and disconnect handling.

Starlette only notices a client that left when a write fails, which can be a long time while an
engine is busy; this response always listens for ``http.disconnect`` and cancels the stream at
once, then closes the body iterator so its ``finally`` (cancel the gRPC call, send Abort) runs.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = "data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content, **kwargs) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **kwargs.pop("headers", {})}
        super().__init__(content, headers=headers, **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream_then_stop() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the write failed: the client is gone
                        pass
                    tg.cancel_scope.cancel()

                async def disconnect_then_stop() -> None:
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(stream_then_stop)
                tg.start_soon(disconnect_then_stop)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


class ClientDisconnected(Exception):
    pass


async def until_disconnect(request: Request, awaitable):
    """Await ``awaitable`` unless the client disconnects first; then cancel it and raise ClientDisconnected."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        watcher.cancel()
        work.cancel()
        raise
    watcher.cancel()
    if work.done():
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    raise ClientDisconnected()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
