"""Offline trace replay against any OpenAI-compatible endpoint (``kvfabric bench replay``).

One request's life: a trace line becomes a ``TraceRequest`` (traces.py); its hash ids become
token blocks that keep the trace's prefix sharing (prompts.py); the client sends it open-loop at
its (scaled) arrival time and times every streamed chunk (client.py); the timings become TTFT,
TPOT, ITL, E2E and goodput (metrics.py), written as JSON, markdown and PNG (report.py).

This package talks HTTP only: it imports nothing from engine, the services or torch, so it can
measure kvfabric, vLLM or anything else that speaks the OpenAI completions API.
"""

from bench.replay.traces import TraceError, TraceRequest, load_trace

__all__ = ["TraceError", "TraceRequest", "load_trace"]
