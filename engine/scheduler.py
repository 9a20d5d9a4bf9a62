"""Continuous batching: which requests run this step, and how many tokens each computes.

The decision is a mapping ``{request_id: num_new_tokens}`` (vLLM V1's shape): a request is just
``num_computed_tokens`` behind ``num_tokens``, so a prefill chunk, a prefix-cache hit, a KV load
and a decode are the same arithmetic. Running requests are served first (FCFS), then waiting
ones, under a per-step token budget (chunked prefill) and ``max_num_seqs``. When the block pool
runs dry, the most recently admitted running request is preempted and recomputed later.

A request whose KV comes from a connector asynchronously waits in ``waiting_for_remote_kv``
(status WAITING_FOR_REMOTE_KV) with its blocks allocated, outside the batch, until the connector
reports the load finished (then it rejoins the waiting queue with those tokens computed) or
failed. A failed load is recomputed: the request goes back to the head of the queue with its
blocks freed and computes its prompt (and any tokens already generated elsewhere, which are not
sampled again) itself; under the connector's ``kv_load_failure_policy: fail`` it finishes with
the error instead. A finished request whose blocks the connector must keep for an async send is
``held`` until the connector reports the send done; while held blocks exceed the connector's
``held_block_budget`` no new request is admitted (backpressure: they wait, none fails).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus

if TYPE_CHECKING:  # the engine calls a connector through its interface; it never imports one
    from kv_connector.base import KVConnectorBase


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_ids: list[int]

    @property
    def samples(self) -> bool:
        """True when this step computes the request's last known token, so its logits are used."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # one-token requests (decodes) first, then prefill chunks
    preempted_ids: list[str] = field(default_factory=list)
    connector_meta: Any = None

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        return {s.request.request_id: s.num_new_tokens for s in self.scheduled}

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    block_size: int


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, kv_cache_manager: KVCacheManager,
        connector: KVConnectorBase | None = None,
    ) -> None:
        self.config = config
        self.kv = kv_cache_manager
        self.connector = connector
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_for_remote_kv: dict[str, Request] = {}
        self.held: dict[str, Request] = {}  # finished, blocks kept for an async send
        self.errors: dict[str, str] = {}  # request_id -> why it failed (reported once)
        self._pending_load_tokens: dict[str, int] = {}  # request_id -> tokens computed once loaded
        self._finished_since_step: list[Request] = []
        self.num_preemptions = 0
        self.num_aborted = 0
        self.num_load_failures_recomputed = 0
        self.num_backpressure_steps = 0  # steps that admitted nothing because held blocks were over budget
        self.held_budget = (connector.held_block_budget(kv_cache_manager.block_pool.num_blocks)
                            if connector is not None else None)

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.append(request)
        if self.connector is not None:
            self.connector.request_added(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus, error: str | None = None) -> None:
        """End requests from outside a step (abort, stop string, load failure)."""
        for rid in request_ids:
            if rid in self.held and self.connector is not None:
                self.connector.abort(rid)  # a held prefill nobody will fetch: release it now
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req.status == RequestStatus.WAITING_FOR_REMOTE_KV and self.connector is not None:
                self.connector.abort(rid)  # producer frees its held blocks now, not at expiry
            if error is not None:
                self.errors[rid] = error
            self._finish(req, status)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.num_aborted += status == RequestStatus.FINISHED_ABORTED
        if req in self.running:
            self.running.remove(req)
        elif req.request_id in self.waiting_for_remote_kv:
            del self.waiting_for_remote_kv[req.request_id]
            self._pending_load_tokens.pop(req.request_id, None)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        hold, params = False, None
        if self.connector is not None:
            hold, params = self.connector.request_finished(req, self.kv.get_block_ids(req.request_id))
        req.kv_transfer_params = params  # from here on: what a continuing engine needs, if anything
        if hold:
            self.held[req.request_id] = req
        else:
            self.kv.free(req)
        del self.requests[req.request_id]
        self._finished_since_step.append(req)

    def take_finished(self) -> list[Request]:
        done, self._finished_since_step = self._finished_since_step, []
        return done

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ---- one step --------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        self._poll_connector()
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, ScheduledRequest] = {}
        preempted: list[str] = []

        for req in list(self.running):
            if req.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            if num_new <= 0:
                continue
            while self.kv.allocate_slots(req, num_new) is None:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                undone = scheduled.pop(victim.request_id, None)
                budget += undone.num_new_tokens if undone else 0
                if victim is req:
                    break
            else:
                scheduled[req.request_id] = ScheduledRequest(req, num_new, self.kv.get_block_ids(req.request_id))
                budget -= num_new
            if budget <= 0:
                break

        # Admitting new work while evicting running work would thrash: skip this step.
        if self.waiting and self._held_over_budget():
            self.num_backpressure_steps += 1
            budget = 0
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            computed_blocks: list = []
            num_external, load_async = 0, False
            if req.num_computed_tokens == 0:
                computed_blocks, num_local = self.kv.get_computed_blocks(req)
                if self.connector is not None:
                    num_external, load_async = self.connector.get_num_new_matched_tokens(req, num_local)
                num_computed = num_local + num_external
            else:  # KV already loaded through the connector
                num_computed = req.num_computed_tokens
            num_new = 0 if load_async else min(req.num_tokens - num_computed, budget)
            fresh = req.num_computed_tokens == 0
            new_blocks = self.kv.allocate_slots(
                req, num_new, computed_blocks if fresh else (), num_external if fresh else 0
            )
            if new_blocks is None:
                break
            self.waiting.popleft()
            if fresh:
                req.num_cached_tokens = num_computed
                if self.connector is not None:  # sync loads too: the worker half fills these blocks
                    self.connector.update_state_after_alloc(req, self.kv.get_block_ids(req.request_id), num_external)
            if load_async:
                req.status = RequestStatus.WAITING_FOR_REMOTE_KV
                self._pending_load_tokens[req.request_id] = num_computed
                self.waiting_for_remote_kv[req.request_id] = req
                continue
            req.num_computed_tokens = num_computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled[req.request_id] = ScheduledRequest(req, num_new, self.kv.get_block_ids(req.request_id))
            budget -= num_new

        ordered = sorted(scheduled.values(), key=lambda s: s.num_new_tokens > 1)
        out = SchedulerOutput(ordered, preempted)
        if self.connector is not None:
            out.connector_meta = self.connector.build_connector_meta(out.num_scheduled_tokens)
        return out

    def _held_over_budget(self) -> bool:
        if self.held_budget is None or not self.held:
            return False
        return sum(len(self.kv.get_block_ids(rid)) for rid in self.held) >= self.held_budget

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _poll_connector(self) -> None:
        if self.connector is None:
            return
        sent, received, failed = self.connector.get_finished()
        for rid in sent:
            req = self.held.pop(rid, None)
            if req is not None:
                self.kv.free(req)
        for rid in received:
            req = self.waiting_for_remote_kv.pop(rid, None)
            if req is None:
                continue
            req.num_computed_tokens = self._pending_load_tokens.pop(rid)
            self.kv.cache_blocks(req, req.num_computed_tokens)
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)
        for rid, why in failed.items():
            self._pending_load_tokens.pop(rid, None)
            req = self.waiting_for_remote_kv.get(rid)
            if req is None:
                continue
            if self.connector.kv_load_failure_policy == "fail":
                self.errors[rid] = f"KV transfer failed: {why}"
                self._finish(req, RequestStatus.FINISHED_ABORTED)
                continue
            # Recompute: no byte of the failed load is trusted, so its blocks go back unregistered
            # (cache_blocks never ran for them) and the prompt is computed here from scratch.
            del self.waiting_for_remote_kv[rid]
            self.kv.free(req)
            req.kv_transfer_params = None
            req.num_computed_tokens = 0
            req.num_cached_tokens = 0
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)
            self.num_load_failures_recomputed += 1

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> None:
        """Advance computed counts, register full blocks in the prefix cache, apply token stops."""
        for s in out.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            self.kv.cache_blocks(req, req.num_computed_tokens)
            token = sampled.get(req.request_id)
            if token is None:
                continue
            req.output_token_ids.append(token)
            status = self._check_stop(req, token)
            if status is not None:
                self._finish(req, status)

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        params = req.sampling_params
        if req.num_output_tokens >= params.min_tokens:
            if token in req.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                req.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def stats(self) -> dict[str, Any]:
        return {
            "num_running": len(self.running),
            "num_waiting": len(self.waiting) + len(self.waiting_for_remote_kv),
            "num_waiting_for_remote_kv": len(self.waiting_for_remote_kv),
            "num_held_for_transfer": len(self.held),
            "num_preemptions": self.num_preemptions,
            "num_aborted": self.num_aborted,
            "kv_load_failures_recomputed": self.num_load_failures_recomputed,
            "num_backpressure_steps": self.num_backpressure_steps,
            "num_blocks_held_for_transfer": sum(len(self.kv.get_block_ids(r)) for r in self.held),
        }
