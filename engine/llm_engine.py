"""The step API the services drive: add_request, step, abort_request.

One process, one loop: ``step()`` schedules, runs the model once, samples, applies stops and
returns what changed. A KV connector, when handed in, is called at fixed points (before the
forward to start loads, after it to save, at schedule time to learn what finished) and nowhere
else; the engine never imports a connector implementation.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from engine.attention.backend import get_attention_backend
from engine.block_hash import model_hash_seed
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_budget import GPUMemory, activation_bytes, kv_budget_bytes
from engine.kv_cache_manager import KVCacheManager
from engine.kv_events import create_kv_events
from engine.model_runner import ModelRunner, kv_cache_shape
from engine.models import load_model, resolve_model_path
from engine.outputs import CompletionOutput, RequestOutput
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.tokenizer import load_tokenizer

if TYPE_CHECKING:
    from engine.dcp_group import DCPGroup
    from kv_connector.base import KVConnectorBase

logger = logging.getLogger(__name__)

KV_LAYOUT = "block-major-v1"  # [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
_CPU_KV_BYTES = 1 << 30


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, kv_connector: KVConnectorBase | None = None,
                 dcp_group: DCPGroup | None = None, **overrides: Any) -> None:
        """``dcp_group``: this process's rank of a decode-context-parallel group (engine/dcp_runner.py);
        on ranks other than 0 the caller then runs ``runner.serve_worker()`` instead of steps."""
        config = config or EngineConfig(**overrides)
        config.validate()
        self.config = config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        torch.manual_seed(config.seed)
        self.model_path = resolve_model_path(config.model)
        self.model, self.model_config = load_model(self.model_path, self.dtype, self.device, config.load_format)
        self.tokenizer = load_tokenizer(self.model_path)
        mc = self.model_config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {mc.max_position_embeddings}")
        bs = config.block_size
        self.dcp_group = dcp_group
        dcp = 1 if dcp_group is None else dcp_group.size
        num_blocks = self._num_kv_blocks()
        if dcp > 1:  # one block id means the same block on every rank: the smallest cache decides
            num_blocks = dcp_group.min_int(num_blocks)
        if num_blocks - 1 < -(-self.max_model_len // (bs * dcp)):
            raise ValueError(f"the KV cache holds {(num_blocks - 1) * bs * dcp} tokens, fewer than max_model_len "
                             f"{self.max_model_len}: raise the KV budget or lower max_model_len")
        self.eos_token_ids = frozenset(mc.eos_token_ids) | (
            {self.tokenizer.eos_token_id} if self.tokenizer is not None and self.tokenizer.eos_token_id is not None
            else set())
        dtype_name = str(self.dtype).removeprefix("torch.")
        self.kv_layout = {
            "layout": KV_LAYOUT, "block_size": bs, "num_layers": mc.num_layers,
            "num_kv_heads": mc.num_kv_heads, "head_dim": mc.head_dim, "dtype": dtype_name,
            "model_id": mc.model_id,
        }
        self.backend = get_attention_backend(config.attention_backend, bs, self.device)
        # The torch reference backend keeps the torch expressions too, so it stays the reference.
        self.model.use_fused_kernels(config.fused_kernels and self.backend.name == "triton")
        if dcp_group is None:
            self.runner = ModelRunner(self.model, mc, self.backend, num_blocks, bs, self.dtype, self.device,
                                      self.eos_token_ids,
                                      kv_connector.allocate_kv_cache if kv_connector is not None else None)
            if self.device.type == "cuda" and not config.enforce_eager and self.backend.name == "triton":
                self.runner.capture_cuda_graphs(config.max_num_seqs, self.max_model_len)
        else:  # eager; the KV manager's blocks are rounds of one block per rank (attention/dcp_backend.py)
            from engine.dcp_kv_landing import DCPKVLanding
            from engine.dcp_runner import DCPModelRunner

            self.runner = DCPModelRunner(dcp_group, self.model, mc, self.backend, num_blocks, bs, self.dtype,
                                         self.device, self.eos_token_ids)
            if kv_connector is not None:
                kv_connector = DCPKVLanding(kv_connector, self.runner, bs, -(-self.max_model_len // bs) + 1)
        layout_name = KV_LAYOUT if dcp == 1 else f"{KV_LAYOUT}+dcp{dcp}"
        # A block the prefix cache drops for reuse is offered to the connector first (tiers save it).
        self.kv_cache_manager = KVCacheManager(
            num_blocks, bs * dcp, config.enable_prefix_caching,
            model_hash_seed(mc.model_id, dtype_name, bs * dcp, layout_name),
            on_evict=kv_connector.on_block_evicted if kv_connector is not None else None)
        self.kv_events = create_kv_events(config.kv_events_config, "GPU" if self.device.type == "cuda" else "CPU")
        if self.kv_events is not None:
            self.kv_cache_manager.block_pool.events = self.kv_events.collector
        self.connector = kv_connector
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len, bs),
            self.kv_cache_manager, kv_connector)
        if kv_connector is not None:
            kv_connector.register_kv_cache(self.runner.kv_cache, self.kv_layout)
        self._detokenizers: dict[str, IncrementalDetokenizer | None] = {}
        self._prompts: dict[str, str | None] = {}
        self._final_only: set[str] = set()  # requests added with stream=False
        self._ids = itertools.count()
        self.last_step_num_tokens = 0
        logger.info("engine ready: model=%s dtype=%s device=%s kv_blocks=%d (%d tokens) max_model_len=%d dcp=%d",
                    self.model_path, dtype_name, self.device, num_blocks - 1, (num_blocks - 1) * bs * dcp,
                    self.max_model_len, dcp)

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        block_bytes = torch.Size(kv_cache_shape(self.model_config, 1, cfg.block_size)).numel() * self.dtype.itemsize
        if cfg.kv_cache_bytes is not None:
            budget = cfg.kv_cache_bytes
        elif self.device.type == "cuda":  # this engine's share of the whole GPU (engine/kv_budget.py)
            free, total = torch.cuda.mem_get_info(self.device)
            mc = self.model_config
            budget = kv_budget_bytes(GPUMemory(total, free, torch.cuda.memory_reserved(self.device)),
                                     cfg.gpu_memory_utilization, activation_bytes(
                                         cfg.max_num_batched_tokens, mc.hidden_size, mc.intermediate_size,
                                         mc.vocab_size, cfg.max_num_seqs, self.dtype.itemsize))
        else:
            budget = _CPU_KV_BYTES
        return max(budget // block_bytes, 2)

    # ---- requests ------------------------------------------------------------------------------

    def add_request(
        self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None,
        kv_transfer_params: dict[str, Any] | None = None, output_token_ids: list[int] | None = None,
        stream: bool = True,
    ) -> Request:
        """Queue a request. ``output_token_ids``: tokens already generated elsewhere (the first token
        of a remote prefill), counted against max_tokens and continued from exactly. ``stream``
        False: ``step`` reports the request only when it finishes (offline generation: building an
        output per request per step is ~5 us each, most of the host time of a large decode batch)."""
        params = params or SamplingParams()
        params.validate()
        request_id = str(next(self._ids)) if request_id is None else request_id
        if request_id in self.scheduler.requests or request_id in self._detokenizers:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_text = prompt if isinstance(prompt, str) else None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            token_ids = self.tokenizer(prompt).input_ids
        else:
            token_ids = list(prompt)
        self._validate_prompt(token_ids, output_token_ids or [])
        max_tokens = self.max_model_len - len(token_ids) if params.max_tokens is None else params.max_tokens
        req = Request(request_id, token_ids, params, eos_token_ids=self.eos_token_ids, max_tokens=max_tokens,
                      kv_transfer_params=kv_transfer_params, output_token_ids=list(output_token_ids or []))
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens,
                                           params.stop, params.include_stop_str_in_output)
            if req.output_token_ids:  # their text was already emitted by whoever generated them
                detok.add_tokens(req.output_token_ids)
        self._detokenizers[request_id] = detok
        self._prompts[request_id] = prompt_text
        if not stream:
            self._final_only.add(request_id)
        self.scheduler.add_request(req)
        return req

    def _validate_prompt(self, token_ids: list[int], output_token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in token_ids + output_token_ids):
            raise ValueError(f"token ids must be integers in [0, {vocab})")
        total = len(token_ids) + len(output_token_ids)
        if total >= self.max_model_len:
            raise ValueError(f"the prompt has {total} tokens; this model's maximum context length is "
                             f"{self.max_model_len}, which leaves no room to generate")

    def abort_request(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.scheduler.finish_requests(ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def has_work(self) -> bool:
        """Unfinished requests, or blocks held for a transfer that the connector must be polled about."""
        return self.scheduler.num_unfinished > 0 or bool(self.scheduler.held)

    # ---- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        self.last_step_num_tokens = out.total_num_scheduled_tokens
        token_ids: dict[str, int] = {}
        logprobs: dict[str, tuple] = {}
        if self.connector is not None:  # loads start even in steps that compute nothing
            self.connector.start_load_kv(out.connector_meta)
        if out.scheduled:
            result = self.runner.execute(out)
            if self.connector is not None:
                self.connector.save_kv(out.connector_meta)
            token_ids, logprobs = result.token_ids, result.logprobs
        self.scheduler.update_from_output(out, token_ids)

        touched: dict[str, Request] = {s.request.request_id: s.request for s in out.scheduled
                                       if s.request.request_id in token_ids}
        deltas: dict[str, str] = {}
        for rid, req in touched.items():
            if rid in logprobs:
                req.logprobs.append(logprobs[rid])
            detok = self._detokenizers.get(rid)
            if detok is None:
                continue
            deltas[rid] = detok.add_tokens([token_ids[rid]])
            if detok.stop_matched is not None and not req.is_finished:
                req.stop_reason = detok.stop_matched
                self.scheduler.finish_requests([rid], RequestStatus.FINISHED_STOPPED)
        for req in self.scheduler.take_finished():
            touched[req.request_id] = req
        if self.kv_events is not None:
            self.kv_events.flush()
        final_only = self._final_only
        return [self._make_output(req, token_ids.get(rid), deltas.get(rid, "")) for rid, req in touched.items()
                if req.is_finished or rid not in final_only]

    def _make_output(self, req: Request, new_token: int | None, delta: str) -> RequestOutput:
        rid = req.request_id
        detok = self._detokenizers.get(rid)
        finished = req.is_finished
        if finished:
            # Text held back (a split character, a possible stop string) is emitted at the end,
            # unless another engine continues this request and will emit it.
            if detok is not None and detok.stop_matched is None and req.kv_transfer_params is None:
                delta += detok.flush()
            self._detokenizers.pop(rid, None)
            self._final_only.discard(rid)
            self.runner.release([rid])
        want_lp = req.sampling_params.logprobs is not None
        completion = CompletionOutput(
            index=0,
            text=detok.output_text if detok is not None else "",
            token_ids=list(req.output_token_ids),
            finish_reason=req.status.finish_reason,
            stop_reason=req.stop_reason,
            logprobs=list(req.logprobs) if want_lp else None,
            cumulative_logprob=sum(lp for lp, _ in req.logprobs) if want_lp else None,
        )
        return RequestOutput(
            request_id=rid,
            prompt=self._prompts.pop(rid, None) if finished else self._prompts.get(rid),
            prompt_token_ids=req.prompt_token_ids,
            outputs=[completion],
            finished=finished,
            num_cached_tokens=req.num_cached_tokens,
            kv_transfer_params=req.kv_transfer_params if finished else None,
            new_token_ids=[new_token] if new_token is not None else [],
            new_text=delta,
            new_logprobs=req.logprobs[-1:] if (want_lp and new_token is not None) else [],
            error=self.scheduler.errors.pop(rid, None) if finished else None,
        )

    # ---- introspection ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        s = {**self.kv_cache_manager.stats(), **self.scheduler.stats()}
        if self.connector is not None:
            s["connector"] = self.connector.stats()
        return s

    def wait_for_work(self, timeout: float = 0.002) -> None:
        """Idle briefly when only remote KV loads are pending (nothing to compute this step)."""
        time.sleep(timeout)

    def routing_info(self) -> dict[str, Any]:
        """What a router needs to hash prompts as this engine does and to follow its KV events."""
        kv = self.kv_cache_manager
        return {"block_hash_seed": kv.hash_seed.hex(), "hash_block_size": kv.block_size,
                **({f"kv_events_{k}": v for k, v in self.kv_events.endpoints.items()} if self.kv_events else {}),
                **({"kv_events_topic": self.kv_events.cfg.topic} if self.kv_events else {})}

    def shutdown(self) -> None:
        if self.kv_events is not None:
            self.kv_events.shutdown()
        if self.connector is not None:
            self.connector.shutdown()
        if self.dcp_group is not None:
            self.dcp_group.close()
