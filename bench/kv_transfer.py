"""KV-transfer bandwidth: one hand-off of N bytes through a connector, producer cache → consumer cache.

Each point times one complete pull as the engine sees it — ``start_load_kv`` until
``get_finished`` reports the request loaded (read request, every block written into the
consumer's cache, ``done`` sent) — and checks the bytes arrived intact. The first pull of a point
also connects and handshakes: it is reported apart (``first_seconds``), the point is the median
of the next ``--repeats``. Three block shapes:

- ``large``: 2 MiB blocks (Llama-3.1-8B, bf16, 16 tokens: 32 layers × K/V × 16 × 8 heads × 128),
  scattered ids — few frames;
- ``small``: 16 KiB blocks, scattered ids — one frame per block, the per-message cost;
- ``small-contiguous``: 16 KiB blocks, consecutive ids — coalesced into runs.

Two modes:

- ``--processes 1`` (default): producer and consumer connector in this process; ``--device``
  puts both caches on the CPU or on the current GPU. On one host this is loopback: it measures
  the connector's own overhead, not a network.
- ``--processes 2``: the producer runs in its own process (``bench/kv_transfer_2proc.py``), as
  prefill and decode do. ``--producer-gpu``/``--consumer-gpu`` place the two caches (prefill on
  GPU 0, decode on GPU 1 of a 2-GPU machine), ``--producer-memory host`` keeps the producer's
  cache in pinned host memory instead: the transfer then crosses PCIe once, host → GPU.

The same run measures the link's peaks (``peaks``: memcpy on CPU; pinned H2D, D2H,
device-to-device and GPU-to-GPU copies on a GPU) and each point carries its fraction of the peak
that bounds it (``vs_peak``, against ``bound``). A series stops growing once one of its points
takes longer than ``--max-seconds-per-point``; ``--time-budget-s`` bounds the whole run. Skipped
points are in the file with the reason.

``python -m bench.kv_transfer --out DIR [--name NAME]`` writes ``NAME.json`` and ``NAME.png``;
``--plot-from A.json B.json ...`` draws several such files side by side into ``NAME.png``, and
``--summary A.json ...`` prints them as one table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from bench.report import environment, save_json, save_plot
from kv_connector import KVTransferConfig, create_connector

MB = 1 << 20
SHAPES = {  # name -> (layout of one block, scattered block ids?)
    "large": (dict(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128), True),
    "small": (dict(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64), True),
    "small-contiguous": (dict(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64), False),
}


def block_bytes(layout: dict) -> int:
    return layout["num_layers"] * 2 * layout["block_size"] * layout["num_kv_heads"] * layout["head_dim"] * 2


def _best_gbps(fn, nbytes: int, sync: Callable[[], None], repeats: int = 5) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return nbytes / min(times) / 1e9


def link_peaks(device: str, consumer_gpu: int = 0, producer_gpu: int | None = None,
               nbytes: int = 256 * MB) -> dict[str, float]:
    """GB/s of the copies a transfer on this placement is bounded by (best of 5)."""
    if device != "cuda":
        a, b = torch.empty(nbytes, dtype=torch.uint8).random_(), torch.empty(nbytes, dtype=torch.uint8)
        return {"memcpy": _best_gbps(lambda: b.copy_(a), nbytes, lambda: None)}
    dev = torch.device("cuda", consumer_gpu)
    sync = torch.cuda.synchronize
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d1, d2 = torch.empty(nbytes, dtype=torch.uint8, device=dev), torch.empty(nbytes, dtype=torch.uint8, device=dev)
    host2 = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    up, down = torch.cuda.Stream(dev), torch.cuda.Stream(dev)

    def both_ways() -> None:  # what a relay through host memory does: D2H and H2D at once
        with torch.cuda.stream(down):
            host2.copy_(d2, non_blocking=True)
        with torch.cuda.stream(up):
            d1.copy_(host, non_blocking=True)

    peaks = {"h2d_pinned": _best_gbps(lambda: d1.copy_(host, non_blocking=True), nbytes, sync),
             "d2h_pinned": _best_gbps(lambda: host.copy_(d1, non_blocking=True), nbytes, sync),
             "d2d": _best_gbps(lambda: d2.copy_(d1), nbytes, sync),
             "both_ways_pinned": _best_gbps(both_ways, nbytes, sync)}  # payload each way
    if producer_gpu is not None and producer_gpu != consumer_gpu:
        src = torch.empty(nbytes, dtype=torch.uint8, device=torch.device("cuda", producer_gpu))
        peaks[f"gpu{producer_gpu}_to_gpu{consumer_gpu}"] = _best_gbps(lambda: d1.copy_(src), nbytes, sync)
    return peaks


def bound_of(peaks: dict[str, float], producer_memory: str = "device", through_host: bool = False) -> str:
    """The copy that bounds a transfer: what ``vs_peak`` is a fraction of. Through host memory a
    device-to-device transfer crosses PCIe twice, both ways at once: ``both_ways_pinned`` bounds it."""
    if "memcpy" in peaks:
        return "memcpy"
    if producer_memory == "host":
        return "h2d_pinned"
    if through_host:
        return min(("h2d_pinned", "d2h_pinned", "both_ways_pinned"), key=lambda k: peaks.get(k, float("inf")))
    return next((k for k in peaks if k.startswith("gpu")), "d2d")


# ---- one hand-off, split at the process boundary ------------------------------------------------


class _Req:
    def __init__(self, rid: str, num_tokens: int, params: dict | None = None) -> None:
        self.request_id, self.status, self.block_hashes = rid, None, []
        self.kv_transfer_params = params if params is not None else {"do_remote_decode": True}
        self.prompt_token_ids, self.output_token_ids = list(range(num_tokens)), [0]
        self.num_computed_tokens = num_tokens if params is None else 0  # producer side: all computed

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


def make_connector(name: str, role: str, layout: dict, num_blocks: int, extra: dict, device: torch.device,
                   pinned: bool = False):
    c = create_connector(KVTransferConfig(kv_connector=name, kv_role=role, kv_connector_extra_config=extra))
    shape = (num_blocks, layout["num_layers"], 2, layout["block_size"], layout["num_kv_heads"], layout["head_dim"])
    cache = c.allocate_kv_cache(shape, torch.bfloat16, torch.device(device))  # as the engine asks (ipc: shared)
    if cache is None:
        cache = torch.zeros(shape, dtype=torch.bfloat16, device=device, pin_memory=pinned)
    c.register_kv_cache(cache, {**layout, "dtype": "bfloat16", "model_id": "bench"})
    return c


def hold(producer, rid: str, remote: list[int], block_size: int) -> dict:
    """Producer side: a finished prefill of ``remote`` → its kv_transfer_params (plain JSON)."""
    _, params = producer.request_finished(_Req(rid, len(remote) * block_size), remote)
    return params


def wait_released(producer, rid: str, timeout: float = 60.0) -> None:
    """Producer side: until the consumer's ``done`` frees the blocks for the next repeat."""
    deadline = time.monotonic() + timeout
    while rid not in producer.get_finished()[0]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"producer never released {rid}")
        time.sleep(0.0002)


def pull(consumer, rid: str, params: dict, local: list[int], block_size: int) -> float:
    """Consumer side: seconds from ``start_load_kv`` until the load is reported finished."""
    req = _Req(rid, len(local) * block_size, params)
    n, _ = consumer.get_num_new_matched_tokens(req, 0)
    consumer.update_state_after_alloc(req, local, n)
    meta = consumer.build_connector_meta({})
    t0 = time.perf_counter()
    consumer.start_load_kv(meta)
    while True:  # an engine asks once a step; every 50 us here, so the wait adds little to the figure
        _, recved, failed = consumer.get_finished()
        if recved or failed:
            break
        time.sleep(0.00005)
    dt = time.perf_counter() - t0
    if failed:
        raise RuntimeError(f"transfer failed: {failed}")
    return dt


def block_ids(nb: int, scattered: bool, g: torch.Generator) -> list[int]:
    """Ids 1..nb (0 is the engine's null block), shuffled when the shape is scattered."""
    return ((torch.randperm(nb, generator=g) + 1) if scattered else torch.arange(1, nb + 1)).tolist()


# ---- the sweep both modes share --------------------------------------------------------------------


Measure = Callable[[str, str, dict, bool, int], dict]  # (connector, shape, layout, scattered, num_blocks) -> row


def sweep(connector_names: list[str], shapes: list[str], sizes: list[int], measure: Measure,
          max_point_s: float = float("inf"), budget_s: float = float("inf")) -> list[dict]:
    """Every (connector, shape, size) point through ``measure``, with the run's time guards."""
    results: list[dict] = []
    t_start = time.monotonic()
    for name in connector_names:
        for shape in shapes:
            layout, scattered = SHAPES[shape]
            bb = block_bytes(layout)
            why_skip, last_nb = None, 0
            for size in sizes:
                nb = max(1, size // bb)
                if nb == last_nb:  # sizes below one block round up to the same single block
                    continue
                last_nb = nb
                base = {"connector": name, "shape": shape, "block_bytes": bb, "num_blocks": nb, "bytes": nb * bb}
                if why_skip is None and time.monotonic() - t_start > budget_s:
                    why_skip = f"time budget of {budget_s:.0f}s spent"
                if why_skip is not None:
                    results.append({**base, "skipped": why_skip})
                    continue
                row = {**base, **measure(name, shape, layout, scattered, nb)}
                results.append(row)
                if "error" in row:
                    print(f"{name:7s} {shape:17s} {nb * bb / MB:8.2f} MB: {row['error']}", flush=True)
                    why_skip = "an earlier point of this series failed"
                    continue
                print(f"{name:7s} {shape:17s} {nb * bb / MB:8.2f} MB in {nb:6d} blocks: {row['seconds'] * 1e3:9.2f} ms "
                      f"{row['gb_per_s']:7.2f} GB/s  intact={row['bytes_equal']}", flush=True)
                if row["seconds"] > max_point_s:
                    why_skip = f"{nb * bb / MB:.2f} MB already took {row['seconds']:.1f}s"
    return results


def point(times: list[float], nbytes: int, ok: bool) -> dict:
    """``times[0]``: the first pull, which also connects; the point is the median of the rest."""
    t = statistics.median(times[1:])
    return {"seconds": t, "gb_per_s": nbytes / t / 1e9, "first_seconds": times[0], "all_seconds": times[1:],
            "bytes_equal": ok}


def add_vs_peak(results: list[dict], peaks: dict[str, float], bound: str) -> None:
    for r in results:
        if "gb_per_s" in r:
            r["vs_peak"] = r["gb_per_s"] / peaks[bound]


# ---- one process ----------------------------------------------------------------------------------


def run(connector_names: list[str], sizes: list[int], repeats: int = 3, extra: dict | None = None,
        device: str = "cpu", shapes: list[str] | None = None, max_point_s: float = float("inf"),
        budget_s: float = float("inf")) -> dict:
    """Both connectors in this process: bandwidth of each for each payload size (bytes) and shape."""
    extra = extra or {}
    peaks = link_peaks(device)
    print("link peaks (GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()), flush=True)
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")

    def measure(name: str, shape: str, layout: dict, scattered: bool, nb: int) -> dict:
        try:
            producer = make_connector(name, "kv_producer", layout, nb + 1, extra, dev)
            consumer = make_connector(name, "kv_consumer", layout, nb + 1, extra, dev)
        except Exception as e:  # noqa: BLE001 - a transport missing here is a result, not a crash
            return {"error": f"cannot run: {type(e).__name__}: {e}"}
        try:
            producer.kv_cache.view(torch.int16).random_()  # real-looking bytes, and every block differs
            g = torch.Generator().manual_seed(nb)
            times = []
            for i in range(repeats + 1):  # the first also connects and handshakes: reported apart
                remote, local = block_ids(nb, scattered, g), block_ids(nb, scattered, g)
                params = hold(producer, f"r{i}", remote, layout["block_size"])
                times.append(pull(consumer, f"d{i}", params, local, layout["block_size"]))
                wait_released(producer, f"r{i}")
            ok = torch.equal(consumer.kv_cache[local].view(torch.uint8), producer.kv_cache[remote].view(torch.uint8))
        except Exception as e:  # noqa: BLE001
            return {"error": f"{type(e).__name__}: {e}"}
        finally:
            producer.shutdown()
            consumer.shutdown()
        return point(times, nb * block_bytes(layout), ok)

    results = sweep(connector_names, shapes or list(SHAPES), sizes, measure, max_point_s, budget_s)
    bound = bound_of(peaks)
    add_vs_peak(results, peaks, bound)
    return {"benchmark": "kv_transfer", "mode": "one process", "env": environment(dev), "repeats": repeats,
            "extra_config": extra, "device": device, "placement": f"one process, both caches on {dev}", "peaks": peaks,
            "bound": bound, "results": results}


# ---- report ------------------------------------------------------------------------------------------


def _plot_one(ax, data: dict) -> None:
    series: dict[tuple[str, str], list] = {}
    for r in data["results"]:
        if "gb_per_s" in r:
            series.setdefault((r["connector"], r["shape"]), []).append(r)
    names = sorted({name for name, _ in series})
    styles = {"large": ("-", "o"), "small": (":", "v"), "small-contiguous": ("--", "s")}
    for (name, shape), rs in series.items():
        ls, marker = styles.get(shape, ("-", "o"))
        ax.plot([r["bytes"] / MB for r in rs], [r["gb_per_s"] for r in rs], ls=ls, marker=marker,
                color=f"C{names.index(name)}", label=f"{name} / {shape}")
    for i, (k, v) in enumerate(data.get("peaks", {}).items()):
        ax.axhline(v, ls="-.", lw=1, color=f"C{9 - i}", label=f"peak {k} {v:.0f} GB/s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("payload (MiB)")
    ax.set_ylabel("GB/s (start_load_kv → finished_recving)")
    ax.set_title(data.get("placement", data.get("device", "")), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def plot(datas: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datas), figsize=(7 * len(datas), 4.8), squeeze=False)
    for ax, data in zip(axes[0], datas):
        _plot_one(ax, data)
    env = datas[0]["env"]
    fig.suptitle(f"KV transfer, {env['device']}, commit {env['commit']}", fontsize=10)
    save_plot(fig, path)


def summary(datas: list[dict], at_mb: tuple[int, ...] = (64, 256, 1024)) -> str:
    """One line per (file, connector, shape): GB/s at the payloads the targets speak of, and the
    best fraction of the bounding peak at >= 64 MiB."""
    lines = [f"{'placement':44s} {'connector':9s} {'shape':17s} " + " ".join(f"{m:>6d}MB" for m in at_mb)
             + "  best>=64MB vs peak"]
    for data in datas:
        where = data.get("placement", data.get("device", ""))[:44]
        rows: dict[tuple[str, str], dict[int, dict]] = {}
        for r in data["results"]:
            rows.setdefault((r["connector"], r["shape"]), {})[round(r["bytes"] / MB)] = r
        for (name, shape), by_mb in rows.items():
            cells = []
            for m in at_mb:
                r = by_mb.get(m, {})
                cells.append(f"{r['gb_per_s']:8.2f}" if "gb_per_s" in r else f"{'fail' if 'error' in r else '-':>8s}")
            big = [r for mb, r in by_mb.items() if mb >= 64 and "vs_peak" in r]
            best = max(big, key=lambda r: r["vs_peak"], default=None)
            tail = f"{best['vs_peak'] * 100:5.1f}% of {data['bound']}" if best else ""
            lines.append(f"{where:44s} {name:9s} {shape:17s} " + " ".join(cells) + "  " + tail)
        lines.append(f"{'':44s} peaks GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in data["peaks"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kv_transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connectors", default="zmq,inproc,nixl,ucx")
    p.add_argument("--sizes-mb", default="0.0625,1,16,64,256,1024")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"any of {', '.join(SHAPES)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--processes", type=int, default=1, choices=[1, 2])
    p.add_argument("--producer-gpu", type=int, default=0, help="--processes 2 --device cuda")
    p.add_argument("--consumer-gpu", type=int, default=0, help="--processes 2 --device cuda")
    p.add_argument("--producer-memory", default="device", choices=["device", "host"],
                   help="host: the producer's cache in pinned host memory (--processes 2 --device cuda)")
    p.add_argument("--through-host", action="store_true",
                   help="ipc connector without CUDA IPC: GPU caches exchange through its shared pinned ring")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-frame-bytes", type=int, default=None, help="zmq extra config")
    p.add_argument("--extra", default=None, help='connector extra config as JSON, e.g. {"peer_error_handling": false}')
    p.add_argument("--max-seconds-per-point", type=float, default=float("inf"),
                   help="a series stops growing after a point slower than this")
    p.add_argument("--time-budget-s", type=float, default=float("inf"))
    p.add_argument("--out", default="bench_results/kv_transfer")
    p.add_argument("--name", default=None, help="file names (default kv_transfer, kv_transfer_2proc)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--plot-from", nargs="+", default=None, metavar="JSON", help="only draw these files into NAME.png")
    p.add_argument("--summary", nargs="+", default=None, metavar="JSON", help="only print a table of these files")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.summary:
        print(summary([json.loads(Path(f).read_text()) for f in args.summary]))
        return 0
    if args.plot_from:
        path = out / f"{args.name or 'kv_transfer'}.png"
        plot([json.loads(Path(f).read_text()) for f in args.plot_from], path)
        print(f"wrote {path}")
        return 0
    extra = {"max_frame_bytes": args.max_frame_bytes} if args.max_frame_bytes else {}
    if args.extra:
        extra.update(json.loads(args.extra))
    if args.through_host:
        extra["cuda_ipc"] = False
    names, shapes = args.connectors.split(","), args.shapes.split(",")
    sizes = [int(float(s) * MB) for s in args.sizes_mb.split(",")]
    if args.processes == 2:
        from bench.kv_transfer_2proc import run_two_process

        data = run_two_process(names, sizes, args.repeats, extra, args.device, args.producer_gpu, args.consumer_gpu,
                               args.producer_memory, shapes, args.max_seconds_per_point, args.time_budget_s)
    else:
        data = run(names, sizes, args.repeats, extra, args.device, shapes, args.max_seconds_per_point,
                   args.time_budget_s)
    name = args.name or ("kv_transfer_2proc" if args.processes == 2 else "kv_transfer")
    save_json(out / f"{name}.json", data)
    if not args.no_plot:
        plot([data], out / f"{name}.png")
    print(f"wrote {out / name}.json" + ("" if args.no_plot else " and .png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
