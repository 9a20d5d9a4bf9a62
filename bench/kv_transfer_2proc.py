"""KV-transfer bandwidth between two processes: the producer connector in a child process, the
consumer (and the clock) here — prefill and decode as they are deployed.

The child (``python -m bench.kv_transfer_2proc``, started by ``run_two_process``) reads one JSON
command a line on stdin and answers one JSON line on stdout, prefixed ``KVB `` because NIXL
logs to stdout too. Nothing is pickled. Commands: ``setup`` (a connector and a cache filled with
a pattern), ``hold`` (a finished prefill of given blocks → its ``kv_transfer_params``),
``wait_released`` (until the consumer's ``done`` frees them), ``teardown``, ``exit``.

The pattern is a function of (block id, position), so the consumer checks every byte it pulled
against what it should be without a second copy crossing the process boundary. Placements:
both caches on the CPU; producer on GPU ``--producer-gpu``, consumer on ``--consumer-gpu``; or
``--producer-memory host``: the producer's cache in pinned host memory, the consumer's on its GPU.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench.kv_transfer import (SHAPES, add_vs_peak, block_bytes, block_ids, bound_of, hold, link_peaks,
                               make_connector, point, pull, sweep, wait_released)
from bench.report import environment

_PREFIX = "KVB "
_CALL_TIMEOUT_S = 300.0  # a 1 GB setup on a slow CPU, or a transfer that never ends


def _wrap16(x: torch.Tensor) -> torch.Tensor:
    x = x & 0xFFFF
    return (x - (x >= 32768).to(x.dtype) * 65536).to(torch.int16)


def pattern_offsets(ids: torch.Tensor) -> torch.Tensor:
    """One int16 per block: every block's bytes differ from every other block's."""
    return _wrap16(ids.to(torch.int64) * 40503)


def pattern_base(elems: int, device: torch.device) -> torch.Tensor:
    """One int16 per position within a block: a shifted byte range shows."""
    return _wrap16(torch.arange(elems, dtype=torch.int64, device=device) * 7919 + 17)


def _as_int16(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(cache.shape[0], -1).view(torch.int16)


def fill_pattern(cache: torch.Tensor) -> None:
    v = _as_int16(cache)
    v.copy_(pattern_base(v.shape[1], v.device).expand_as(v))
    v.add_(pattern_offsets(torch.arange(v.shape[0], device=v.device))[:, None])  # int16 wraps


def matches_pattern(cache: torch.Tensor, local: list[int], remote: list[int], chunk_bytes: int = 64 << 20) -> bool:
    """Do the consumer's blocks ``local`` hold the producer's pattern for blocks ``remote``?"""
    v = _as_int16(cache)
    base = pattern_base(v.shape[1], v.device)
    step = max(1, chunk_bytes // (2 * v.shape[1]))
    loc = torch.tensor(local, device=v.device)
    rem = torch.tensor(remote, device=v.device)
    for i in range(0, len(local), step):
        want = base[None, :] + pattern_offsets(rem[i:i + step])[:, None]
        if not torch.equal(v[loc[i:i + step]], want):
            return False
    return True


# ---- the producer process --------------------------------------------------------------------------


def _reply(msg: dict[str, Any]) -> None:
    sys.stdout.write(_PREFIX + json.dumps(msg) + "\n")
    sys.stdout.flush()


def serve_producer() -> None:
    conn = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "setup":
                device = torch.device(cmd["device"])
                if device.type == "cuda":
                    torch.cuda.set_device(device)
                pinned = bool(cmd.get("pinned")) and torch.cuda.is_available()
                conn = make_connector(cmd["connector"], "kv_producer", cmd["layout"], cmd["num_blocks"], cmd["extra"],
                                      device, pinned=pinned)
                fill_pattern(conn.kv_cache)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                where = " pinned" if conn.kv_cache.is_pinned() else (" shared" if getattr(conn, "_cache_seg", None)
                                                                     else "")
                _reply({"ok": True, "cache": f"{conn.kv_cache.device}{where}"})
            elif op == "hold":
                _reply({"params": hold(conn, cmd["rid"], cmd["remote"], cmd["block_size"])})
            elif op == "wait_released":
                wait_released(conn, cmd["rid"])
                _reply({"ok": True})
            elif op == "teardown":
                if conn is not None:
                    conn.shutdown()
                conn = None
                _reply({"ok": True})
            elif op == "exit":
                break
        except Exception as e:  # noqa: BLE001 - the consumer records it as the point's error
            _reply({"error": f"{type(e).__name__}: {e}"})
    if conn is not None:
        conn.shutdown()


class ProducerProcess:
    """The child process and its JSON-lines pipe."""

    def __init__(self) -> None:
        repo = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.kv_transfer_2proc"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0, env=env)
        self._buf = b""

    def call(self, timeout: float = _CALL_TIMEOUT_S, **cmd: Any) -> dict[str, Any]:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                text = line.decode(errors="replace")
                if text.startswith(_PREFIX):
                    return json.loads(text[len(_PREFIX):])
                print(f"[producer] {text}", flush=True)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"producer did not answer {cmd['op']!r} in {timeout:.0f}s")
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                raise RuntimeError(f"producer exited ({self.proc.wait()}) during {cmd['op']!r}")
            self._buf += chunk

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"op": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# ---- the consumer side (this process) -----------------------------------------------------------------


def run_two_process(connector_names: list[str], sizes: list[int], repeats: int = 3, extra: dict | None = None,
                    device: str = "cpu", producer_gpu: int = 0, consumer_gpu: int = 0,
                    producer_memory: str = "device", shapes: list[str] | None = None,
                    max_point_s: float = float("inf"), budget_s: float = float("inf")) -> dict:
    extra = extra or {}
    if device == "cuda":
        torch.cuda.set_device(consumer_gpu)
        cons_dev = torch.device("cuda", consumer_gpu)
        prod_dev = "cpu" if producer_memory == "host" else f"cuda:{producer_gpu}"
        peaks = link_peaks("cuda", consumer_gpu, None if producer_memory == "host" else producer_gpu)
    else:
        cons_dev, prod_dev, producer_memory = torch.device("cpu"), "cpu", "host"
        peaks = link_peaks("cpu")
    pinned = producer_memory == "host" and device == "cuda"
    placement = (f"two processes, {prod_dev}{' pinned' if pinned else ''} → {cons_dev}"
                 + (" through host memory" if extra.get("cuda_ipc") is False else "")
                 + (" (ring, cache not shared)" if extra.get("share_host_cache") is False else ""))
    print(f"{placement}; link peaks (GB/s): " + ", ".join(f"{k} {v:.1f}" for k, v in peaks.items()), flush=True)
    producer = ProducerProcess()

    def measure(name: str, shape: str, layout: dict, scattered: bool, nb: int) -> dict:
        ready = producer.call(op="setup", connector=name, layout=layout, num_blocks=nb + 1, extra=extra,
                              device=prod_dev, pinned=pinned)
        if "error" in ready:
            producer.call(op="teardown")
            return {"error": f"producer cannot run: {ready['error']}"}
        try:
            consumer = make_connector(name, "kv_consumer", layout, nb + 1, extra, cons_dev)
        except Exception as e:  # noqa: BLE001
            producer.call(op="teardown")
            return {"error": f"consumer cannot run: {type(e).__name__}: {e}"}
        try:
            g = torch.Generator().manual_seed(nb)
            times = []
            for i in range(repeats + 1):  # the first also connects and handshakes: reported apart
                remote, local = block_ids(nb, scattered, g), block_ids(nb, scattered, g)
                held = producer.call(op="hold", rid=f"r{i}", remote=remote, block_size=layout["block_size"])
                if "error" in held:
                    return {"error": f"producer: {held['error']}"}
                times.append(pull(consumer, f"d{i}", held["params"], local, layout["block_size"]))
                producer.call(op="wait_released", rid=f"r{i}")
            ok = matches_pattern(consumer.kv_cache, local, remote)
        except Exception as e:  # noqa: BLE001
            return {"error": f"{type(e).__name__}: {e}"}
        finally:
            consumer.shutdown()
            producer.call(op="teardown")
        return {**point(times, nb * block_bytes(layout), ok), "producer_cache": ready["cache"]}

    try:
        results = sweep(connector_names, shapes or list(SHAPES), sizes, measure, max_point_s, budget_s)
    finally:
        producer.close()
    bound = bound_of(peaks, producer_memory, through_host=extra.get("cuda_ipc") is False)
    add_vs_peak(results, peaks, bound)
    return {"benchmark": "kv_transfer", "mode": "two processes", "env": environment(cons_dev), "repeats": repeats,
            "extra_config": extra, "device": device, "placement": placement, "producer_gpu": producer_gpu,
            "consumer_gpu": consumer_gpu, "producer_memory": producer_memory, "peaks": peaks, "bound": bound,
            "results": results}


if __name__ == "__main__":
    serve_producer()
