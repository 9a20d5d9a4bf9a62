"""``serve(config)``: the proxy under uvicorn, in this process, until SIGINT/SIGTERM."""

from __future__ import annotations

import uvicorn

from proxy.app import create_app
from proxy.config import ProxyConfig


def serve(config: ProxyConfig) -> None:
    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info", access_log=False,
                timeout_graceful_shutdown=5)
