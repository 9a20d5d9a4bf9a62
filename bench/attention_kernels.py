"""Micro-benchmark of the Triton attention kernels against their floors and torch SDPA.

Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head_dim 128, bf16, block 16):

- decode: batch 1/8/32/128/256 at 1k context. Timed two ways: ``triton.testing.do_bench``
  (median; L2 flushed before each call; includes the host launch gap) and one CUDA graph that
  replays the call over enough distinct input sets to exceed L2 (what a graph-captured decode
  step sees). Floor: K+V+q+out bytes over the copy bandwidth measured in this run.
- prefill: one causal prompt of 512/2k/8k tokens, K/V read from the paged cache. Floor: causal
  FLOPs (2·N²·Hq·D) over the bf16 matmul rate measured in this run.
- torch SDPA on the same math with contiguous (unpaged) K/V, ``enable_gqa=True``, for reference.

``python bench/attention_kernels.py --out DIR`` (CUDA only) writes ``attention_kernels.json``
(and ``attention_kernels.png`` when matplotlib is present).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.floors import measure_floors  # noqa: E402
from bench.report import environment, save_json, save_plot  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
DECODE_BATCHES = [1, 8, 32, 128, 256]
DECODE_CONTEXT = 1024
PREFILL_TOKENS = [512, 2048, 8192]
ROTATE_BYTES = 256 << 20  # inputs touched per graph replay: several times the H100's 50 MB L2


def _paged_cache(num_seqs: int, seq_len: int, device: torch.device):
    """A 2-layer cache (so the layer view is strided like the engine's) with scattered blocks."""
    per_seq = math.ceil(seq_len / BLOCK_SIZE)
    num_blocks = num_seqs * per_seq + 1
    kv = torch.randn(num_blocks, 2, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    tables = (torch.randperm(num_blocks - 1, device=device)[: num_seqs * per_seq] + 1).to(torch.int32)
    return kv[:, 1], tables.view(num_seqs, per_seq)


def _graph_time_ms(fns, device: torch.device, reps: int = 20) -> float:
    """Median time of one call, from a CUDA graph that runs every fn once (each on its own inputs)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end) / len(fns))
    times.sort()
    return times[len(times) // 2]


def bench_decode(batch: int, floors: dict, device: torch.device, sdpa: bool = True) -> dict:
    from triton.testing import do_bench

    from engine.attention.triton_decode import choose_num_splits, paged_decode_attention, _num_sms

    scale = HEAD_DIM**-0.5
    kv_bytes = batch * DECODE_CONTEXT * NUM_KV_HEADS * HEAD_DIM * 2 * DTYPE.itemsize
    io_bytes = 2 * batch * NUM_HEADS * HEAD_DIM * DTYPE.itemsize
    min_bytes = kv_bytes + io_bytes
    num_sets = max(1, min(64, math.ceil(ROTATE_BYTES / min_bytes)))
    sets = []
    for _ in range(num_sets):
        layer_cache, tables = _paged_cache(batch, DECODE_CONTEXT, device)
        seq_lens = torch.full((batch,), DECODE_CONTEXT, dtype=torch.int32, device=device)
        query = torch.randn(batch, NUM_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
        out = torch.empty_like(query)
        lse = torch.empty(batch, NUM_HEADS, device=device, dtype=torch.float32)
        sets.append((query, layer_cache, tables, seq_lens, out, lse))

    def call(s):
        return lambda: paged_decode_attention(s[0], s[1], s[2], s[3], scale, out=s[4], lse=s[5])

    triton_ms = do_bench(call(sets[0]), warmup=25, rep=200, return_mode="median")
    graph_ms = _graph_time_ms([call(s) for s in sets], device)
    floor_ms = min_bytes / floors["copy_bytes_per_s"] * 1e3
    res = {"batch": batch, "context": DECODE_CONTEXT, "num_splits": choose_num_splits(
        batch, NUM_KV_HEADS, sets[0][2].shape[1], BLOCK_SIZE, _num_sms(device)),
        "min_bytes": min_bytes, "floor_ms": floor_ms, "triton_do_bench_ms": triton_ms,
        "triton_graph_ms": graph_ms, "graph_input_sets": num_sets,
        "graph_bandwidth_TBps": min_bytes / (graph_ms * 1e-3) / 1e12, "graph_over_floor": graph_ms / floor_ms}
    del sets
    if not sdpa:
        return res
    try:  # the same math on contiguous K/V, one layer's worth
        q = torch.randn(batch, NUM_HEADS, 1, HEAD_DIM, device=device, dtype=DTYPE)
        k = torch.randn(batch, NUM_KV_HEADS, DECODE_CONTEXT, HEAD_DIM, device=device, dtype=DTYPE)
        v = torch.randn_like(k)
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q, k, v, scale=scale, enable_gqa=True)
        res["sdpa_do_bench_ms"] = do_bench(fn, warmup=25, rep=200, return_mode="median")
    except Exception as e:  # noqa: BLE001 - an SDPA backend gap is a result, not a failure
        res["sdpa_error"] = repr(e)
    return res


def bench_prefill(num_tokens: int, floors: dict, device: torch.device, sdpa: bool = True) -> dict:
    from triton.testing import do_bench

    from engine.attention.triton_prefill import paged_prefill_attention

    scale = HEAD_DIM**-0.5
    layer_cache, tables = _paged_cache(1, num_tokens, device)
    query = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    seq_lens = torch.tensor([num_tokens], dtype=torch.int32, device=device)
    qsl = torch.tensor([0, num_tokens], dtype=torch.int32, device=device)
    out = torch.empty_like(query)
    lse = torch.empty(num_tokens, NUM_HEADS, device=device, dtype=torch.float32)
    fn = lambda: paged_prefill_attention(query, layer_cache, tables, seq_lens, qsl, scale, 0, 1,  # noqa: E731
                                         num_tokens, out, lse)
    triton_ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
    flops = 2 * num_tokens * num_tokens * NUM_HEADS * HEAD_DIM  # QK^T and PV, causal half of 4·N²·H·D
    floor_ms = flops / floors["matmul_flops_per_s"] * 1e3
    res = {"tokens": num_tokens, "causal_flops": flops, "floor_ms": floor_ms, "triton_do_bench_ms": triton_ms,
           "triton_TFLOPs": flops / (triton_ms * 1e-3) / 1e12, "triton_over_floor": triton_ms / floor_ms}
    if not sdpa:
        return res
    try:
        q = query.transpose(0, 1).unsqueeze(0).contiguous()
        k = torch.randn(1, NUM_KV_HEADS, num_tokens, HEAD_DIM, device=device, dtype=DTYPE)
        v = torch.randn_like(k)
        sfn = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        res["sdpa_do_bench_ms"] = do_bench(sfn, warmup=25, rep=200, return_mode="median")
        res["sdpa_TFLOPs"] = flops / (res["sdpa_do_bench_ms"] * 1e-3) / 1e12
    except Exception as e:  # noqa: BLE001
        res["sdpa_error"] = repr(e)
    return res


DECODE_SWEEP = [dict(BLOCK_N=n, num_warps=w, num_stages=st) for n, w, st in
                [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 4, 4), (32, 4, 3)]]
SPLIT_SWEEP = [1, 2, 4, 8]  # PROGRAMS_PER_SM
SWEEP_DECODE_BATCHES, SWEEP_SPLIT_BATCHES, SWEEP_PREFILL_TOKENS = (1, 32, 256), (8, 16, 32), (512, 2048, 8192)
PREFILL_SWEEP = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st, PACK_GQA=pk) for m, n, w, st, pk in
                 [(128, 64, 8, 3, False), (128, 64, 4, 3, False), (128, 128, 8, 2, False), (128, 128, 8, 3, False),
                  (64, 64, 4, 3, False), (64, 64, 4, 4, False), (64, 128, 4, 2, False),
                  (128, 64, 8, 3, True), (128, 64, 4, 3, True), (128, 128, 8, 2, True), (64, 64, 4, 3, True),
                  (128, 32, 4, 3, True)]]


def sweep(floors: dict, device: torch.device) -> dict:
    """Every tile config and split target timed on the same shapes, so one device call picks them."""
    from engine.attention import triton_decode, triton_prefill

    out = {"decode_tile": [], "decode_splits": [], "prefill_tile": []}
    saved_tile, saved_ptile = dict(triton_decode.TILE), dict(triton_prefill.TILE)
    saved_pps = triton_decode.PROGRAMS_PER_SM
    try:
        for cfg in DECODE_SWEEP:
            triton_decode.TILE.clear()
            triton_decode.TILE.update(cfg)
            for b in SWEEP_DECODE_BATCHES:
                r = _try(lambda: bench_decode(b, floors, device, sdpa=False))
                out["decode_tile"].append({**cfg, "batch": b, **r})
        triton_decode.TILE.clear()
        triton_decode.TILE.update(saved_tile)
        for pps in SPLIT_SWEEP:
            triton_decode.PROGRAMS_PER_SM = pps
            for b in SWEEP_SPLIT_BATCHES:
                out["decode_splits"].append({"programs_per_sm": pps, "batch": b,
                                             **_try(lambda: bench_decode(b, floors, device, sdpa=False))})
        triton_decode.PROGRAMS_PER_SM = saved_pps
        for cfg in PREFILL_SWEEP:
            triton_prefill.TILE.clear()
            triton_prefill.TILE.update(cfg)
            for n in SWEEP_PREFILL_TOKENS:
                out["prefill_tile"].append({**cfg, **_try(lambda: bench_prefill(n, floors, device, sdpa=False))})
    finally:
        triton_decode.TILE.clear()
        triton_decode.TILE.update(saved_tile)
        triton_decode.PROGRAMS_PER_SM = saved_pps
        triton_prefill.TILE.clear()
        triton_prefill.TILE.update(saved_ptile)
    return out


def _try(fn) -> dict:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a config that fails to compile (shared memory) is a result
        return {"error": repr(e)[:300]}


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    dec = result["decode"]
    xs = [d["batch"] for d in dec]
    a.plot(xs, [d["triton_graph_ms"] * 1e3 for d in dec], "o-", label="triton (graph replay)")
    a.plot(xs, [d["triton_do_bench_ms"] * 1e3 for d in dec], "s--", label="triton (do_bench)")
    a.plot(xs, [d["floor_ms"] * 1e3 for d in dec], "k:", label="bytes / copy bandwidth")
    if all("sdpa_do_bench_ms" in d for d in dec):
        a.plot(xs, [d["sdpa_do_bench_ms"] * 1e3 for d in dec], "^-", label="torch SDPA, unpaged (do_bench)")
    a.set(xscale="log", yscale="log", xlabel="batch (context 1k)", ylabel="µs per layer", title="decode attention")
    a.legend(fontsize=8)
    pre = result["prefill"]
    xs = [p["tokens"] for p in pre]
    b.plot(xs, [p["triton_TFLOPs"] for p in pre], "o-", label="triton (paged)")
    if all("sdpa_TFLOPs" in p for p in pre):
        b.plot(xs, [p["sdpa_TFLOPs"] for p in pre], "^-", label="torch SDPA, unpaged")
    b.axhline(result["floors"]["matmul_flops_per_s"] / 1e12, color="k", ls=":", label="bf16 matmul rate")
    b.set(xscale="log", xlabel="prompt tokens", ylabel="TFLOP/s (causal)", title="prefill attention")
    b.legend(fontsize=8)
    save_plot(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sweep", action="store_true", help="also time every tile config and split target")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/attention_kernels.py needs a CUDA device")
    device = torch.device("cuda")
    torch.manual_seed(0)
    floors = measure_floors(device, DTYPE)
    result = {"env": environment(device), "shape": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS,
              "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE, "dtype": str(DTYPE)}, "floors": floors,
              "decode": [], "prefill": []}
    import triton

    result["env"]["triton"] = triton.__version__
    for b in DECODE_BATCHES:
        result["decode"].append(bench_decode(b, floors, device))
        torch.cuda.empty_cache()
    for n in PREFILL_TOKENS:
        result["prefill"].append(bench_prefill(n, floors, device))
        torch.cuda.empty_cache()
    if args.sweep:
        result["sweep"] = sweep(floors, device)
    save_json(args.out / "attention_kernels.json", result)
    _plot(result, args.out / "attention_kernels.png")

    print(f"device {result['env']['device']}; copy {floors['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 matmul {floors['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    print(f"{'decode B':>9} {'splits':>6} {'floor us':>9} {'graph us':>9} {'x floor':>8} {'TB/s':>6} "
          f"{'do_bench us':>11} {'sdpa us':>8}")
    for d in result["decode"]:
        print(f"{d['batch']:>9} {d['num_splits']:>6} {d['floor_ms'] * 1e3:>9.1f} {d['triton_graph_ms'] * 1e3:>9.1f} "
              f"{d['graph_over_floor']:>8.2f} {d['graph_bandwidth_TBps']:>6.2f} {d['triton_do_bench_ms'] * 1e3:>11.1f} "
              f"{d.get('sdpa_do_bench_ms', float('nan')) * 1e3:>8.1f}")
    print(f"{'prefill N':>9} {'floor us':>9} {'triton us':>9} {'x floor':>8} {'TFLOP/s':>8} {'sdpa us':>8} "
          f"{'sdpa TF/s':>9}")
    for p in result["prefill"]:
        print(f"{p['tokens']:>9} {p['floor_ms'] * 1e3:>9.1f} {p['triton_do_bench_ms'] * 1e3:>9.1f} "
              f"{p['triton_over_floor']:>8.2f} {p['triton_TFLOPs']:>8.1f} "
              f"{p.get('sdpa_do_bench_ms', float('nan')) * 1e3:>8.1f} {p.get('sdpa_TFLOPs', float('nan')):>9.1f}")
    if args.sweep:
        sw = result["sweep"]
        print("sweep decode tile (graph us): " + "; ".join(
            f"N{r['BLOCK_N']}w{r['num_warps']}s{r['num_stages']} B{r['batch']} "
            + (f"{r['triton_graph_ms'] * 1e3:.1f}" if "error" not in r else "ERR") for r in sw["decode_tile"]))
        print("sweep decode splits (graph us): " + "; ".join(
            f"pps{r['programs_per_sm']} B{r['batch']} S{r.get('num_splits')} "
            + (f"{r['triton_graph_ms'] * 1e3:.1f}" if "error" not in r else "ERR") for r in sw["decode_splits"]))
        print("sweep prefill tile (us): " + "; ".join(
            f"M{r['BLOCK_M']}N{r['BLOCK_N']}w{r['num_warps']}s{r['num_stages']}{'p' if r['PACK_GQA'] else ''} "
            f"T{r.get('tokens')} "
            + (f"{r['triton_do_bench_ms'] * 1e3:.0f}" if "error" not in r else "ERR") for r in sw["prefill_tile"]))


if __name__ == "__main__":
    main()
