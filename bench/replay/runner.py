"""One replay run end to end: warm up, scrape counters, replay the schedule, scrape again, and
assemble the run report (settings, environment, endpoint, metrics, every request)."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass

from bench.replay import client as replay_client
from bench.replay.client import ClientConfig
from bench.replay.metrics import output_throughput_timeline, summarize
from bench.replay.report import RUN_KIND, environment
from bench.replay.server_metrics import server_metric_deltas
from bench.replay.traces import Trace


@dataclass
class RunPlan:
    trace: Trace
    prompts: object                 # PromptBuilder or TextPrompts: .build(request, index), .describe()
    client: ClientConfig
    label: str
    start: int = 0
    num_requests: int | None = None
    time_scale: float = 1.0
    rate: float | None = None
    warmup: int = 0
    duration_s: float | None = None
    slo: dict | None = None
    seed: int = 0
    prompt_format: str = "ids"
    max_model_len: int | None = None

    def settings(self) -> dict:
        p = self.prompts.describe()
        return {"trace": self.trace.source, "trace_format": self.trace.format,
                "trace_requests": len(self.trace.requests), "start": self.start, "num_requests": self.num_requests,
                "time_scale": self.time_scale, "rate": self.rate, "warmup": self.warmup,
                "duration_s": self.duration_s, "max_concurrency": self.client.max_concurrency,
                "request_timeout_s": self.client.request_timeout_s, "seed": self.seed,
                "prompt_format": self.prompt_format, "max_model_len": self.max_model_len,
                "length_scale": p["length_scale"], "block_tokens": p["block_tokens"],
                "trace_block_tokens": p["trace_block_tokens"]}


async def endpoint_info(cfg: ClientConfig) -> dict:
    models = await replay_client.get_json(cfg, "/v1/models")
    ids = [m.get("id") for m in (models or {}).get("data", []) if isinstance(m, dict)]
    return {"url": cfg.base_url, "model": cfg.model, "models": ids, "models_response": models}


async def run_once(plan: RunPlan) -> dict:
    schedule = replay_client.build_schedule(plan.trace.requests, plan.start, plan.num_requests,
                                            plan.time_scale, plan.rate, plan.seed)
    if not schedule:
        raise ValueError(f"the slice start={plan.start} num_requests={plan.num_requests} of "
                         f"{plan.trace.source} holds no request")
    clipped = Counter()

    def build_prompt(request, index):
        prompt = plan.prompts.build(request, index)
        clipped[prompt.clipped] += 1
        return prompt

    warm = await replay_client.run_warmup(schedule, build_prompt, plan.client, plan.warmup)
    clipped.clear()
    endpoint = await endpoint_info(plan.client)
    before = await replay_client.get_text(plan.client, "/metrics")
    label = f"{plan.label} @ {plan.rate:g} req/s" if plan.rate else plan.label
    records, wall = await replay_client.run_schedule(schedule, build_prompt, plan.client, plan.duration_s, label)
    after = await replay_client.get_text(plan.client, "/metrics")
    return {
        "kind": RUN_KIND, "label": plan.label, "settings": plan.settings(), "environment": environment(),
        "endpoint": endpoint,
        "prompts": {**plan.prompts.describe(), "clipped": clipped[True]},
        "warmup": {"sent": len(warm), "failed": sum(1 for r in warm if not r.ok),
                   "errors": dict(Counter(r.error for r in warm if not r.ok))},
        "unsent_after_duration": len(schedule) - len(records),
        "metrics": summarize(records, wall, plan.slo or {}),
        "timeline": output_throughput_timeline(records),
        "server_metrics": server_metric_deltas(before, after),
        "requests": [r.to_json() for r in records],
    }


def run_replay(plan: RunPlan) -> dict:
    return asyncio.run(run_once(plan))
