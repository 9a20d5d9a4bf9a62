"""The Triton attention kernels against the torch reference backend.

Runs on a CUDA device (``-m gpu``). With ``TRITON_INTERPRET=1`` it also runs on the CPU through
Triton's interpreter, on smaller shapes (the cases marked ``FULL_ONLY`` need the GPU), so the
kernels' logic can be checked on a machine without one.

Every check draws fresh random inputs, scatters each request's blocks over a cache whose layer
view is strided across blocks, poisons the outputs with NaN before the kernel runs, and measures
‖out − ref‖ / ‖ref‖ against the reference computed in float32 from the same (upcast) inputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.triton_env import DEVICE, FULL, FULL_ONLY, INTERPRET, MARKS, rel_error, seed

pytestmark = MARKS
triton = pytest.importorskip("triton")

from engine.attention.backend import AttentionMetadata  # noqa: E402
from engine.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from engine.attention.triton_decode import paged_decode_attention  # noqa: E402
from engine.attention.triton_kv_write import write_kv  # noqa: E402
from engine.attention.triton_prefill import paged_prefill_attention  # noqa: E402

OUT_TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}  # fp32 dots run in IEEE mode: tf32 (3e-4) fails this
LSE_TOL = {torch.bfloat16: 1e-3, torch.float32: 1e-4}  # absolute; scores are float32 in both paths
HEADS = [(4, 4), (8, 2), (16, 2)] + ([(32, 8)] if FULL else [])  # GQA ratios 1, 4, 8, and Llama-3.1-8B
BOUNDARY_LENS = [1, 15, 16, 17, 31, 32, 33]
DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")]


def _patch_interpreter() -> None:
    """Two gaps of Triton 3.6's interpreter, patched for this module's run only: with numpy >= 2.4
    a loaded scalar cannot be a ``range`` bound, and ``tl.dot`` multiplies bfloat16 operands'
    raw bits. Neither touches compiled kernels."""
    from triton.runtime import interpreter
    import triton.language as tl

    patch_tensor = interpreter._patch_lang_tensor

    def patched_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    create_dot = interpreter.InterpreterBuilder.create_dot

    def patched_dot(self, a, b, d, *args):
        a = self.cast_impl(a, tl.float32) if a.dtype.scalar == tl.bfloat16 else a
        b = self.cast_impl(b, tl.float32) if b.dtype.scalar == tl.bfloat16 else b
        return create_dot(self, a, b, d, *args)

    interpreter._patch_lang_tensor = patched_tensor
    interpreter.InterpreterBuilder.create_dot = patched_dot


if INTERPRET:
    _patch_interpreter()


def make_batch(query_lens, seq_lens, num_kv_heads, head_dim, dtype, block_size=16, extra_cols=2):
    """A random layer cache (a strided view of a 2-layer cache) and metadata whose requests own
    scattered blocks; block tables are padded with the null block 0 past each request's end."""
    num_req = len(seq_lens)
    blocks_per_req = [math.ceil(s / block_size) for s in seq_lens]
    width = max(blocks_per_req, default=0) + extra_cols
    num_blocks = sum(blocks_per_req) + 4
    kv = torch.randn(num_blocks, 2, 2, block_size, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    layer_cache = kv[:, 1]
    ids = (torch.randperm(num_blocks - 1) + 1).tolist()
    block_tables = torch.zeros(num_req, width, dtype=torch.int32)
    for i, n in enumerate(blocks_per_req):
        block_tables[i, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        ids = ids[n:]
    qsl = torch.zeros(num_req + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(query_lens, dtype=torch.int64), 0).to(torch.int32)
    slots = []
    for i, (q, s) in enumerate(zip(query_lens, seq_lens)):
        pos = torch.arange(s - q, s)
        slots.append(block_tables[i, pos // block_size].long() * block_size + pos % block_size)
    num_decodes = next((i for i, q in enumerate(query_lens) if q != 1), num_req)
    meta = AttentionMetadata(
        num_tokens=int(sum(query_lens)), num_decodes=num_decodes, query_start_loc=qsl.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), block_tables=block_tables.to(DEVICE),
        slot_mapping=torch.cat(slots).to(DEVICE) if slots else torch.zeros(0, dtype=torch.int64, device=DEVICE),
        max_query_len=max(query_lens, default=0), max_seq_len=max(seq_lens, default=0),
        query_lens_cpu=list(query_lens), seq_lens_cpu=list(seq_lens),
    )
    return kv, layer_cache, meta


def reference(query, layer_cache, meta, scale, block_size=16):
    return TorchAttentionBackend(block_size).forward(query.float(), layer_cache.float(), meta, scale)


def poisoned(query):
    out = torch.full_like(query, float("nan"))
    lse = torch.full(query.shape[:2], float("nan"), dtype=torch.float32, device=query.device)
    return out, lse


def assert_matches(out, lse, ref_out, ref_lse, dtype):
    assert not out.isnan().any(), "unwritten (or NaN) output elements"
    assert not lse.isnan().any(), "unwritten (or NaN) lse elements"
    assert rel_error(out, ref_out) < OUT_TOL[dtype]
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    if (~empty).any():
        assert (lse[~empty] - ref_lse[~empty]).abs().max().item() < LSE_TOL[dtype]


def _ragged(n, hi):
    return torch.randint(1, hi + 1, (n,)).tolist()


# --- KV write ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 64), (32, 8, 128)])
def test_write_kv_stores_each_token_byte_exact_and_skips_negative_slots(dtype, num_heads, num_kv_heads, head_dim):
    seed("write", dtype, num_kv_heads, head_dim)
    bs, num_blocks, num_tokens = 16, 9, 37
    kv = torch.randn(num_blocks, 2, 2, bs, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    layer_cache = kv[:, 1]
    # K and V as the attention layer has them: strided slices of one fused qkv projection.
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=DEVICE).to(dtype)
    key, value = qkv[:, num_heads: num_heads + num_kv_heads], qkv[:, num_heads + num_kv_heads:]
    slots = torch.randperm((num_blocks - 1) * bs)[:num_tokens] + bs  # distinct, never block 0
    slots[torch.randperm(num_tokens)[:7]] = -1
    slots[-3:] = -1  # padding at the end, as a CUDA-graph batch has
    slots = slots.to(DEVICE)
    expected = kv.clone()
    valid = slots >= 0
    blocks, offsets = slots[valid] // bs, slots[valid] % bs
    expected[blocks, 1, 0, offsets] = key[valid]
    expected[blocks, 1, 1, offsets] = value[valid]

    write_kv(key, value, layer_cache, slots)

    int_view = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(kv.view(int_view), expected.view(int_view))


# --- decode -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
def test_decode_matches_reference_on_boundary_ragged_and_empty_lengths(dtype, head_dim, num_heads, num_kv_heads):
    seed("decode", dtype, head_dim, num_heads, num_kv_heads)
    lens = BOUNDARY_LENS + _ragged(5, 1000 if FULL else 120) + [0]  # 0: a CUDA-graph padding row
    kv, layer_cache, meta = make_batch([1] * len(lens), lens, num_kv_heads, head_dim, dtype)
    query = torch.randn(len(lens), num_heads, head_dim, device=DEVICE).to(dtype)
    scale = head_dim**-0.5
    out, lse = poisoned(query)
    paged_decode_attention(query, layer_cache, meta.block_tables, meta.seq_lens, scale, out=out, lse=lse)
    ref_out, ref_lse = reference(query, layer_cache, meta, scale)
    assert_matches(out, lse, ref_out, ref_lse, dtype)
    assert torch.equal(out[-1], torch.zeros_like(out[-1])) and torch.isneginf(lse[-1]).all()


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 64])
def test_decode_result_does_not_depend_on_the_number_of_splits(num_splits):
    seed("splits", num_splits)
    dtype, num_heads, num_kv_heads, head_dim = torch.bfloat16, 8, 2, 64
    lens = [1, 17, 64, 65, 200, 333]
    kv, layer_cache, meta = make_batch([1] * len(lens), lens, num_kv_heads, head_dim, dtype)
    query = torch.randn(len(lens), num_heads, head_dim, device=DEVICE).to(dtype)
    out, lse = poisoned(query)
    paged_decode_attention(query, layer_cache, meta.block_tables, meta.seq_lens, 0.125, out=out, lse=lse,
                           num_splits=num_splits)
    ref_out, ref_lse = reference(query, layer_cache, meta, 0.125)
    assert_matches(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("block_size", [8, 32])
def test_decode_and_prefill_work_with_other_block_sizes(block_size):
    seed("block_size", block_size)
    dtype, num_heads, num_kv_heads, head_dim = torch.float32, 8, 2, 64
    q_lens, s_lens = [1, 1, 20, 7], [9, 70, 20, 40]
    kv, layer_cache, meta = make_batch(q_lens, s_lens, num_kv_heads, head_dim, dtype, block_size=block_size)
    query = torch.randn(meta.num_tokens, num_heads, head_dim, device=DEVICE).to(dtype)
    out, lse = TritonAttentionBackend(block_size).forward(query, layer_cache, meta, 0.125)
    ref_out, ref_lse = reference(query, layer_cache, meta, 0.125, block_size=block_size)
    assert_matches(out, lse, ref_out, ref_lse, dtype)


@FULL_ONLY
@pytest.mark.parametrize("dtype,num_heads,num_kv_heads,head_dim", [
    (torch.bfloat16, 32, 8, 128), (torch.float32, 8, 2, 64), (torch.bfloat16, 16, 2, 64),
])
def test_decode_long_contexts_up_to_32k(dtype, num_heads, num_kv_heads, head_dim):
    seed("long", dtype, num_heads)
    lens = [32768, 20001, 4097, 1]
    kv, layer_cache, meta = make_batch([1] * len(lens), lens, num_kv_heads, head_dim, dtype)
    query = torch.randn(len(lens), num_heads, head_dim, device=DEVICE).to(dtype)
    out, lse = poisoned(query)
    paged_decode_attention(query, layer_cache, meta.block_tables, meta.seq_lens, head_dim**-0.5, out=out, lse=lse)
    ref_out, ref_lse = reference(query, layer_cache, meta, head_dim**-0.5)
    assert_matches(out, lse, ref_out, ref_lse, dtype)


@FULL_ONLY
def test_decode_large_batch_is_deterministic():
    seed("batch256")
    dtype, num_heads, num_kv_heads, head_dim = torch.bfloat16, 32, 8, 128
    lens = _ragged(256, 2048)
    kv, layer_cache, meta = make_batch([1] * len(lens), lens, num_kv_heads, head_dim, dtype)
    query = torch.randn(len(lens), num_heads, head_dim, device=DEVICE).to(dtype)
    runs = []
    for _ in range(2):
        out, lse = poisoned(query)
        paged_decode_attention(query, layer_cache, meta.block_tables, meta.seq_lens, head_dim**-0.5, out=out, lse=lse)
        runs.append((out, lse))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    ref_out, ref_lse = reference(query, layer_cache, meta, head_dim**-0.5)
    assert_matches(runs[0][0], runs[0][1], ref_out, ref_lse, dtype)


# --- prefill ----------------------------------------------------------------------------------

def _prefill_requests():
    """(query_len, seq_len): whole prompts at block boundaries, later chunks of chunked prefills,
    prompts behind a prefix-cache hit, a one-token chunk; on the GPU also multi-tile prompts."""
    reqs = [(q, q) for q in (15, 16, 17, 31, 32, 33)] + [(31, 64), (33, 65), (1, 40), (50, 50 + 129)]
    if FULL:
        reqs += [(700, 700), (300, 300 + 2000), (129, 4096 + 129)] + [(q, q + c) for q, c in
                                                                      zip(_ragged(4, 600), _ragged(4, 900))]
    return reqs


@pytest.mark.parametrize("pack_gqa", [pytest.param(False, id="per-head"), pytest.param(True, id="packed")])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
def test_prefill_matches_reference_and_writes_only_its_rows(dtype, head_dim, num_heads, num_kv_heads, pack_gqa,
                                                            monkeypatch):
    from engine.attention import triton_prefill

    for tile in (triton_prefill.TILE, triton_prefill.TILE_LARGE):
        monkeypatch.setitem(tile, "PACK_GQA", pack_gqa)
    seed("prefill", dtype, head_dim, num_heads, num_kv_heads, pack_gqa)
    decodes = [(1, 5), (1, 33)]
    reqs = decodes + _prefill_requests()
    q_lens, s_lens = [q for q, _ in reqs], [s for _, s in reqs]
    kv, layer_cache, meta = make_batch(q_lens, s_lens, num_kv_heads, head_dim, dtype)
    query = torch.randn(meta.num_tokens, num_heads, head_dim, device=DEVICE).to(dtype)
    scale = head_dim**-0.5
    out, lse = poisoned(query)
    nd = len(decodes)
    paged_prefill_attention(query, layer_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
                            first_req=nd, num_reqs=len(reqs) - nd, max_query_len=meta.max_query_len, out=out, lse=lse)
    assert out[:nd].isnan().all() and lse[:nd].isnan().all(), "prefill wrote the decodes' rows"
    ref_out, ref_lse = reference(query, layer_cache, meta, scale)
    assert_matches(out[nd:], lse[nd:], ref_out[nd:], ref_lse[nd:], dtype)


# --- the backend: write, then attend, as a layer does ----------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mixed", "decode_only", "prefill_only"])
def test_backend_write_then_forward_matches_torch_backend(dtype, kind):
    seed("backend", dtype, kind)
    num_heads, num_kv_heads, head_dim = 16, 4, 64
    decodes = [(1, s) for s in (1, 16, 17, 90)]
    prefills = [(20, 20), (17, 49), (33, 33), (1, 3)]
    reqs = {"mixed": decodes + prefills, "decode_only": decodes, "prefill_only": prefills}[kind]
    q_lens, s_lens = [q for q, _ in reqs], [s for _, s in reqs]
    kv, layer_cache, meta = make_batch(q_lens, s_lens, num_kv_heads, head_dim, dtype)
    query = torch.randn(meta.num_tokens, num_heads, head_dim, device=DEVICE).to(dtype)
    key = torch.randn(meta.num_tokens, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    value = torch.randn_like(key)
    ref_cache = layer_cache.clone()
    TorchAttentionBackend(16).write_kv(key, value, ref_cache, meta)
    ref_out, ref_lse = reference(query, ref_cache, meta, 0.125)
    if FULL:  # best effort: let the backend's torch.empty get recycled NaN memory
        junk = torch.full((query.shape[0] * 4, *query.shape[1:]), float("nan"), dtype=torch.float32, device=DEVICE)
        del junk

    backend = TritonAttentionBackend(16)
    backend.write_kv(key, value, layer_cache, meta)
    out, lse = backend.forward(query, layer_cache, meta, 0.125)

    assert torch.equal(layer_cache.float(), ref_cache.float())
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_matches(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prompts", ["several", "one"])
def test_fresh_prompts_without_lse_take_sdpa_and_match_the_reference(dtype, prompts):
    """A prefill step of whole prompts whose caller needs no lse reads the step's own K/V through
    SDPA (one prompt: its output returned as is); the result is the same attention as over the
    cache. With lse asked for, the paged kernel still runs (lse comes back)."""
    seed("fresh", dtype, prompts)
    num_heads, num_kv_heads, head_dim = 16, 4, 64
    lens = [20, 1, 49, 33] + ([700, 2100] if FULL else [])
    lens = lens if prompts == "several" else lens[-1:]
    kv, layer_cache, meta = make_batch(lens, lens, num_kv_heads, head_dim, dtype)
    query = torch.randn(meta.num_tokens, num_heads, head_dim, device=DEVICE).to(dtype)
    key = torch.randn(meta.num_tokens, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    value = torch.randn_like(key)
    backend = TritonAttentionBackend(16)
    backend.write_kv(key, value, layer_cache, meta)
    ref_out, ref_lse = reference(query, layer_cache, meta, 0.125)

    out, lse = backend.forward(query, layer_cache, meta, 0.125, key=key, value=value, return_lse=False)
    assert lse is None and out.dtype == dtype
    assert not out.isnan().any() and rel_error(out, ref_out) < OUT_TOL[dtype]

    out, lse = backend.forward(query, layer_cache, meta, 0.125, key=key, value=value)
    assert_matches(out, lse, ref_out, ref_lse, dtype)


@FULL_ONLY
def test_decode_step_replays_in_a_cuda_graph_with_new_lengths_and_tables():
    """Captured once, replayed on other lengths and block tables: nothing in the decode path may
    depend on host-side values of one step (grid, splits) or sync with the host."""
    seed("graph")
    dtype, num_heads, num_kv_heads, head_dim, bs = torch.bfloat16, 32, 8, 128, 16
    batch, width = 8, 64  # a captured batch size and block-table width (max_model_len 1024)
    kv = torch.randn(batch * width + 1, 2, 2, bs, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    layer_cache = kv[:, 1]
    static = dict(
        query=torch.empty(batch, num_heads, head_dim, device=DEVICE, dtype=dtype),
        key=torch.empty(batch, num_kv_heads, head_dim, device=DEVICE, dtype=dtype),
        value=torch.empty(batch, num_kv_heads, head_dim, device=DEVICE, dtype=dtype),
        seq_lens=torch.ones(batch, dtype=torch.int32, device=DEVICE),
        block_tables=torch.zeros(batch, width, dtype=torch.int32, device=DEVICE),
        slot_mapping=torch.full((batch,), -1, dtype=torch.int64, device=DEVICE),
    )

    def meta_for(seq_lens_cpu):
        return AttentionMetadata(
            num_tokens=batch, num_decodes=batch,
            query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=DEVICE),
            seq_lens=static["seq_lens"], block_tables=static["block_tables"], slot_mapping=static["slot_mapping"],
            max_query_len=1, max_seq_len=max(seq_lens_cpu), query_lens_cpu=[1] * batch, seq_lens_cpu=seq_lens_cpu)

    def fill(seq_lens_cpu):
        perm = torch.randperm(batch * width) + 1
        tables = torch.zeros(batch, width, dtype=torch.int32)
        for i, s in enumerate(seq_lens_cpu):
            n = math.ceil(s / bs)
            tables[i, :n] = perm[i * width: i * width + n].to(torch.int32)
        pos = torch.tensor(seq_lens_cpu) - 1
        slots = torch.where(torch.tensor(seq_lens_cpu) > 0,
                            tables[torch.arange(batch), pos.clamp_min(0) // bs].long() * bs + pos.clamp_min(0) % bs, -1)
        static["seq_lens"].copy_(torch.tensor(seq_lens_cpu, dtype=torch.int32))
        static["block_tables"].copy_(tables)
        static["slot_mapping"].copy_(slots)
        for name in ("query", "key", "value"):
            static[name].copy_(torch.randn(static[name].shape))

    backend = TritonAttentionBackend(bs)

    def step(meta):
        backend.write_kv(static["key"], static["value"], layer_cache, meta)
        return backend.forward(static["query"], layer_cache, meta, head_dim**-0.5)

    first = [3, 16, 17, 100, 1, 1024, 512, 33]
    fill(first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(meta_for(first))  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_out, graph_lse = step(meta_for(first))

    for lens in ([1000, 1, 2, 700, 64, 65, 0, 999], [5, 6, 7, 8, 9, 1024, 1023, 15]):
        fill(lens)
        before = layer_cache.clone()
        graph.replay()
        torch.cuda.synchronize()
        meta = meta_for(lens)
        ref_cache = before
        TorchAttentionBackend(bs).write_kv(static["key"], static["value"], ref_cache, meta)
        assert torch.equal(layer_cache.float(), ref_cache.float())
        ref_out, ref_lse = reference(static["query"], layer_cache, meta, head_dim**-0.5)
        assert_matches(graph_out, graph_lse, ref_out, ref_lse, dtype)
