"""One step on the device: scheduler output in, one forward pass, sampled tokens out.

Owns the KV cache tensor (``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``),
the attention backend, the sampler and each seeded request's random generator. Inputs are built
with vectorised numpy per step (a loop over requests, never over tokens or blocks) and moved to
the device in one copy (``HostStaging``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.attention.backend import AttentionBackend, AttentionMetadata
from engine.cuda_graphs import DecodeGraphs
from engine.host_staging import HostStaging
from engine.sampler import Sampler, SamplingBatch, advance_generator
from engine.scheduler import SchedulerOutput


@dataclass
class StepResult:
    token_ids: dict[str, int] = field(default_factory=dict)
    # request_id -> (logprob of the sampled token, [(token_id, logprob), ...] top-n)
    logprobs: dict[str, tuple[float, list[tuple[int, float]]]] = field(default_factory=dict)


def kv_cache_shape(model_config, num_blocks: int, block_size: int) -> tuple[int, ...]:
    return (num_blocks, model_config.num_layers, 2, block_size, model_config.num_kv_heads, model_config.head_dim)


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, model_config, backend: AttentionBackend, num_blocks: int,
        block_size: int, dtype: torch.dtype, device: torch.device, eos_token_ids: frozenset[int],
        allocate_kv_cache=None,
    ) -> None:
        self.model = model
        self.model_config = model_config
        self.backend = backend
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = eos_token_ids
        shape = kv_cache_shape(model_config, num_blocks, block_size)
        # The connector may place the cache (e.g. a host cache in shared memory its peers map).
        cache = allocate_kv_cache(shape, dtype, device) if allocate_kv_cache is not None else None
        self.kv_cache = cache if cache is not None else torch.zeros(shape, dtype=dtype, device=device)
        self.sampler = Sampler()
        self.generators: dict[str, torch.Generator] = {}
        self.graphs: DecodeGraphs | None = None
        self.staging = HostStaging(device)

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        self.graphs = DecodeGraphs(self.model, self.backend, self.kv_cache, max_num_seqs, max_model_len,
                                   self.block_size)
        self.graphs.capture()

    def release(self, request_ids) -> None:
        for rid in request_ids:
            self.generators.pop(rid, None)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def build_metadata(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        reqs = out.scheduled
        bs = self.block_size
        q_lens = np.fromiter((s.num_new_tokens for s in reqs), dtype=np.int64, count=len(reqs))
        starts = np.fromiter((s.request.num_computed_tokens for s in reqs), dtype=np.int64, count=len(reqs))
        seq_lens = starts + q_lens
        cu = np.zeros(len(reqs) + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        num_tokens = int(cu[-1])
        positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(cu[:-1] - starts, q_lens)
        # chain.from_iterable walks the per-request slices in C: no Python-level loop per token.
        input_ids = np.fromiter(itertools.chain.from_iterable(
            s.request.token_ids_slice(s.request.num_computed_tokens, s.request.num_computed_tokens + s.num_new_tokens)
            for s in reqs), dtype=np.int64, count=num_tokens)
        width = int((seq_lens.max() + bs - 1) // bs)
        block_tables = np.zeros((len(reqs), width), dtype=np.int32)
        # One scatter of all requests' block ids (a per-row numpy assignment costs ~4 us a row).
        rows_len = np.fromiter((min(len(s.block_ids), width) for s in reqs), dtype=np.int64, count=len(reqs))
        flat = np.fromiter(itertools.chain.from_iterable(s.block_ids[:width] for s in reqs), dtype=np.int32,
                           count=int(rows_len.sum()))
        row_start = np.repeat(np.cumsum(rows_len) - rows_len, rows_len)
        block_tables[np.repeat(np.arange(len(reqs)), rows_len), np.arange(flat.size) - row_start] = flat
        token_req = np.repeat(np.arange(len(reqs)), q_lens)
        slot_mapping = block_tables[token_req, positions // bs].astype(np.int64) * bs + positions % bs
        qsl_d, seq_lens_d, tables_d, slots_d, ids_d, pos_d = self.staging.to_device(
            cu.astype(np.int32), seq_lens.astype(np.int32), block_tables, slot_mapping, input_ids, positions)
        meta = AttentionMetadata(
            num_tokens=num_tokens,
            num_decodes=int(np.argmax(q_lens > 1)) if (q_lens > 1).any() else len(reqs),
            query_start_loc=qsl_d,
            seq_lens=seq_lens_d,
            block_tables=tables_d,
            slot_mapping=slots_d,
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
            query_lens_cpu=q_lens.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
        )
        return ids_d, pos_d, meta

    def _generator(self, request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None:
            return None
        g = self.generators.get(request.request_id)
        if g is None:
            g = torch.Generator(device=self.device).manual_seed(seed)
            # Tokens generated elsewhere (a prefill instance) consumed draws there: replay them.
            advance_generator(g, self.model_config.vocab_size, request.num_output_tokens)
            self.generators[request.request_id] = g
        return g

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> StepResult:
        input_ids, positions, meta = self.build_metadata(out)
        if self.graphs is not None and self.graphs.can_run(meta):
            hidden = self.graphs.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, self.kv_cache, meta, self.backend)
        sampling = [i for i, s in enumerate(out.scheduled) if s.samples]
        result = StepResult()
        if not sampling:
            return result
        if len(sampling) == meta.num_tokens:  # every token samples (a decode step): no gather
            logits = self.model.compute_logits(hidden[: meta.num_tokens])
        else:
            ends = np.cumsum(meta.query_lens_cpu)[sampling] - 1
            logits = self.model.compute_logits(hidden[self._to_device(ends)])
        reqs = [out.scheduled[i].request for i in sampling]
        batch = SamplingBatch(
            params=[r.sampling_params for r in reqs],
            prompt_token_ids=[r.prompt_token_ids for r in reqs],
            output_token_ids=[r.output_token_ids for r in reqs],
            generators=[self._generator(r) for r in reqs],
            eos_token_ids=self.eos_token_ids,
        )
        sampled = self.sampler(logits, batch)
        token_ids = sampled.token_ids.tolist()
        result.token_ids = {r.request_id: t for r, t in zip(reqs, token_ids)}
        if sampled.logprobs is not None:
            lps = sampled.logprobs.tolist()
            top_ids, top_vals = (x.tolist() for x in sampled.top_logprobs)
            for row, r in enumerate(reqs):
                n = r.sampling_params.logprobs
                if n is not None:
                    result.logprobs[r.request_id] = (lps[row], list(zip(top_ids[row][:n], top_vals[row][:n])))
        return result
