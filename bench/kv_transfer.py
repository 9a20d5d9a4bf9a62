"""KV-transfer bandwidth: one hand-off of N bytes through a connector, producer cache → consumer cache.

Each point times one complete pull as the engine sees it — ``start_load_kv`` until
``get_finished`` reports the request loaded (handshake, every block written into the consumer's
cache, ``done`` sent) — and checks the bytes arrived intact. Three block shapes:

- ``large``: 2 MiB blocks (Llama-3.1-8B, bf16, 16 tokens: 32 layers × K/V × 16 × 8 heads × 128),
  scattered ids — few frames;
- ``small``: 16 KiB blocks, scattered ids — one frame per block, the per-message cost;
- ``small-contiguous``: 16 KiB blocks, consecutive ids — coalesced into ``max_frame_bytes`` frames.

``python -m bench.kv_transfer --out DIR`` writes ``kv_transfer.json`` and ``kv_transfer.png``.
On one host this is loopback: it measures the connector's own overhead, not a network. The same
run measures the link's peak for comparison (``peaks``: memcpy on CPU; pinned H2D, D2H and
device-to-device copies when the caches live on a GPU), and each point carries its fraction of
the peak that bounds it (``vs_peak``). ``--device cuda`` puts both caches on the GPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.report import environment, save_json, save_plot
from kv_connector import KVTransferConfig, create_connector

MB = 1 << 20
SHAPES = {  # name -> (layout of one block, scattered block ids?)
    "large": (dict(num_layers=32, block_size=16, num_kv_heads=8, head_dim=128), True),
    "small": (dict(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64), True),
    "small-contiguous": (dict(num_layers=2, block_size=16, num_kv_heads=2, head_dim=64), False),
}


def link_peaks(device: str, nbytes: int = 256 * MB, repeats: int = 5) -> dict[str, float]:
    """GB/s of the copies a transfer on this device is bounded by (best of ``repeats``)."""
    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return nbytes / min(times) / 1e9

    if device != "cuda":
        a, b = torch.empty(nbytes, dtype=torch.uint8).random_(), torch.empty(nbytes, dtype=torch.uint8)
        return {"memcpy": best(lambda: b.copy_(a))}
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    d1, d2 = torch.empty(nbytes, dtype=torch.uint8, device="cuda"), torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return {"h2d_pinned": best(lambda: d1.copy_(host, non_blocking=True)),
            "d2h_pinned": best(lambda: host.copy_(d1, non_blocking=True)),
            "d2d": best(lambda: d2.copy_(d1))}


def _pair(name: str, layout: dict, num_blocks: int, extra: dict, device: str = "cpu"):
    conns = []
    for role in ("kv_producer", "kv_consumer"):
        c = create_connector(KVTransferConfig(kv_connector=name, kv_role=role, kv_connector_extra_config=extra))
        shape = (num_blocks, layout["num_layers"], 2, layout["block_size"], layout["num_kv_heads"], layout["head_dim"])
        cache = torch.empty(shape, dtype=torch.bfloat16, device=device)
        cache.view(torch.int16).random_()  # real-looking bytes, and every block differs
        c.register_kv_cache(cache, {**layout, "dtype": "bfloat16", "model_id": "bench"})
        conns.append(c)
    return conns


class _Req:
    def __init__(self, rid: str, num_tokens: int, params: dict | None = None) -> None:
        self.request_id, self.status, self.block_hashes = rid, None, []
        self.kv_transfer_params = params if params is not None else {"do_remote_decode": True}
        self.prompt_token_ids, self.output_token_ids = list(range(num_tokens)), [0]
        self.num_computed_tokens = num_tokens if params is None else 0  # producer side: all computed

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


def transfer_once(producer, consumer, rid: str, remote: list[int], local: list[int], block_size: int) -> float:
    """Seconds for one complete pull of ``remote`` into ``local``."""
    ntok = len(remote) * block_size
    _, params = producer.request_finished(_Req(rid, ntok), remote)
    req = _Req("d" + rid, ntok, params)
    n, _ = consumer.get_num_new_matched_tokens(req, 0)
    consumer.update_state_after_alloc(req, local, n)
    meta = consumer.build_connector_meta({})
    t0 = time.perf_counter()
    consumer.start_load_kv(meta)
    while True:
        _, recved, failed = consumer.get_finished()
        if recved or failed:
            break
        time.sleep(0.0002)
    dt = time.perf_counter() - t0
    if failed:
        raise RuntimeError(f"transfer failed: {failed}")
    while not producer.get_finished()[0]:  # blocks released before the next repeat reuses them
        time.sleep(0.0002)
    return dt


def run(connector_names: list[str], sizes: list[int], repeats: int = 3, extra: dict | None = None,
        device: str = "cpu") -> dict:
    """Bandwidth of each connector for each payload size (bytes) and block shape."""
    results = []
    peaks = link_peaks(device)
    bound = peaks.get("d2d", peaks.get("memcpy"))
    print("link peaks (GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()), flush=True)
    for name in connector_names:
        for shape, (layout, scattered) in SHAPES.items():
            block_bytes = layout["num_layers"] * 2 * layout["block_size"] * layout["num_kv_heads"] * layout["head_dim"] * 2
            for size in sizes:
                nb = max(1, size // block_bytes)
                try:
                    producer, consumer = _pair(name, layout, nb + 1, extra or {}, device)
                except Exception as e:  # noqa: BLE001 - a transport missing here is a result, not a crash
                    print(f"{name}: cannot run: {type(e).__name__}: {e}", flush=True)
                    results.append({"connector": name, "shape": shape, "bytes": nb * block_bytes, "error": str(e)})
                    break
                try:
                    g = torch.Generator().manual_seed(size)
                    ids = lambda: ((torch.randperm(nb, generator=g) + 1) if scattered else torch.arange(1, nb + 1)).tolist()
                    times = []
                    for i in range(repeats):
                        remote, local = ids(), ids()
                        times.append(transfer_once(producer, consumer, f"r{i}", remote, local, layout["block_size"]))
                    ok = torch.equal(consumer.kv_cache[local].view(torch.uint8), producer.kv_cache[remote].view(torch.uint8))
                finally:
                    producer.shutdown()
                    consumer.shutdown()
                t = statistics.median(times)
                results.append({"connector": name, "shape": shape, "block_bytes": block_bytes, "num_blocks": nb,
                                "bytes": nb * block_bytes, "seconds": t, "gb_per_s": nb * block_bytes / t / 1e9,
                                "all_seconds": times, "bytes_equal": ok, "vs_peak": nb * block_bytes / t / 1e9 / bound})
                print(f"{name:7s} {shape:17s} {nb * block_bytes / MB:7.1f} MB in {nb:6d} blocks: "
                      f"{t * 1e3:8.2f} ms  {nb * block_bytes / t / 1e9:6.2f} GB/s  intact={ok}", flush=True)
    return {"benchmark": "kv_transfer", "env": environment(), "repeats": repeats, "extra_config": extra or {},
            "device": device, "peaks": peaks, "results": results}


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str], list] = {}
    for r in data["results"]:
        if "error" in r:
            continue
        series.setdefault((r["connector"], r["shape"]), []).append(r)
    for (name, shape), rs in series.items():
        ax.plot([r["bytes"] / MB for r in rs], [r["gb_per_s"] for r in rs], marker="o", label=f"{name} / {shape}")
    for i, (k, v) in enumerate(data.get("peaks", {}).items()):
        ax.axhline(v, ls="--", lw=1, color=f"C{9 - i}", label=f"peak {k} {v:.0f} GB/s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("payload (MiB)")
    ax.set_ylabel("GB/s (start_load_kv → finished_recving)")
    ax.set_title(f"KV transfer, one host ({data['env']['device']}), commit {data['env']['commit']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    save_plot(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kv_transfer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connectors", default="zmq,inproc,nixl,ucx")
    p.add_argument("--sizes-mb", default="0.0625,1,16,64,256,1024")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-frame-bytes", type=int, default=None, help="zmq extra config")
    p.add_argument("--out", default="bench_results/kv_transfer")
    args = p.parse_args(argv)
    extra = {"max_frame_bytes": args.max_frame_bytes} if args.max_frame_bytes else {}
    data = run(args.connectors.split(","), [int(float(s) * MB) for s in args.sizes_mb.split(",")],
               args.repeats, extra, args.device)
    out = Path(args.out)
    save_json(out / "kv_transfer.json", data)
    plot(data, out / "kv_transfer.png")
    print(f"wrote {out / 'kv_transfer.json'} and {out / 'kv_transfer.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
