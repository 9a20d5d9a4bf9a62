"""Serving benchmark: colocated against disaggregated per connector, one ``kvfabric up`` per mode.

For each mode a fresh ``kvfabric up`` starts (the model loads once), every rate of the sweep is
replayed against it (``kvfabric bench replay --sweep``: Poisson arrivals, the trace's lengths and
prefix sharing, fresh prompts per rate), and it is stopped before the next mode starts. A mode is
``colocated`` or a connector name (``auto``, ``zmq``, ``ipc``, ...), with ``+adaptive`` for the
proxy's adaptive disaggregation (``zmq+adaptive``). A mode that fails to start is recorded with
its log's tail and the others still run.

    python -m bench.serving_gpu --modes colocated,auto,zmq,ipc --rates 2,4,8 --num-requests 100 \\
        --trace traces/mooncake_conversation_trace_first_half.jsonl --out out/serving_gpu

Writes into ``--out``: ``serving_gpu.json`` (settings, environment, per mode and rate: req/s
served, TTFT and TPOT p50/p99, goodput, SLO attainment, errors, the proxy's prefill decisions),
``serving_gpu.md`` (the table), ``serving_gpu.png``; the full replay reports (every request) and
each ``up``'s log go under ``--work`` (bench/serving_gpu.sh packs them into one archive). The JSON
is rewritten after every mode, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.replay import cli as replay_cli
from bench.replay.report import environment

KIND = "kvfabric.bench.serving_gpu"


@dataclass(frozen=True)
class Mode:
    name: str
    colocated: bool
    connector: str | None
    policy: str | None  # proxy disaggregation policy; None: the configured default

    @classmethod
    def parse(cls, text: str) -> "Mode":
        name = text.strip()
        if name == "colocated":
            return cls(name, True, None, None)
        connector, _, policy = name.partition("+")
        if not connector or policy not in ("", "adaptive", "always", "never"):
            raise argparse.ArgumentTypeError(f"mode {text!r}: expected colocated, CONNECTOR or CONNECTOR+adaptive")
        return cls(name, False, connector, policy or None)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def up_argv(args: argparse.Namespace, mode: Mode, port: int) -> list[str]:
    argv = [sys.executable, "-m", "kvfabric.cli", "up", "--port", str(port), "--model", args.model,
            "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len),
            "--ready-timeout", str(args.ready_timeout)]
    for flag in ("num_kv_blocks", "device", "dtype", "gpu_memory_utilization", "config"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if mode.colocated:
        return argv + ["--colocated"]
    argv += ["--kv-connector", mode.connector]
    return argv + (["--disaggregation", mode.policy] if mode.policy else [])


class Up:
    """One ``kvfabric up`` in its own process group, its output in a log file."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        self._file = open(log, "w")
        self.proc = subprocess.Popen(argv, stdout=self._file, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "kvfabric is serving at" in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvfabric up exited with {self.proc.returncode} during start-up")
            time.sleep(1.0)
        raise TimeoutError(f"kvfabric up not ready within {timeout:.0f} s")

    def stop(self, grace: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # up stops its children and waits for them
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._file.close()


def replay_argv(args: argparse.Namespace, port: int, label: str, out: Path) -> list[str]:
    return ["--trace", args.trace, "--endpoint", f"http://127.0.0.1:{port}", "--label", label,
            "--num-requests", str(args.num_requests), "--length-scale", str(args.length_scale),
            "--max-model-len", str(args.clip_tokens), "--sweep", args.rates, "--slo", args.slo,
            "--warmup", str(args.warmup), "--vocab-size", str(args.vocab_size),
            "--request-timeout", str(args.request_timeout), "--no-progress", "--output", str(out)]


def _decisions(server_metrics: dict) -> dict[str, float]:
    """``where/reason -> count`` over the run, from the replay's deltas of the proxy's /metrics."""
    out = {}
    for key, delta in server_metrics.get("counters", {}).items():
        if key.startswith("kvfabric_prefill_decisions_total{") and delta:
            labels = {k: v.strip('"') for k, v in (part.split("=", 1) for part in key[key.index("{") + 1:-1].split(","))}
            out[labels["where"] + "/" + labels["reason"]] = delta
    return out


def summarize_run(run: dict) -> dict:
    m = run["metrics"]
    ms = lambda v: None if v is None else 1000.0 * v  # noqa: E731
    return {"rate": run["settings"]["rate"], "requests": m["requests"], "completed": m["completed"],
            "req_per_s_served": m["request_throughput"], "output_tokens_per_s": m["output_throughput"],
            "ttft_p50_ms": ms(m["ttft"]["p50"]), "ttft_p99_ms": ms(m["ttft"]["p99"]),
            "tpot_p50_ms": ms(m["tpot"]["p50"]), "tpot_p99_ms": ms(m["tpot"]["p99"]),
            "goodput_req_per_s": m["goodput"], "slo_attainment": m["slo_attainment"],
            "errors": sum(m["errors"].values()), "error_kinds": m["errors"],
            "prefill_decisions": _decisions(run.get("server_metrics", {}))}


def run_mode(args: argparse.Namespace, mode: Mode, work: Path) -> dict:
    mode_dir = work / mode.name.replace("+", "_")
    mode_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    argv = up_argv(args, mode, port)
    print(f"=== {mode.name}: {' '.join(argv[1:])}", flush=True)
    started = time.monotonic()
    up = Up(argv, mode_dir / "up.log")
    result = {"mode": mode.name, "up_argv": argv[1:]}
    try:
        up.wait_ready(args.ready_timeout)
        result["start_s"] = round(time.monotonic() - started, 1)
        print(f"    ready in {result['start_s']} s", flush=True)
        code = replay_cli.main(replay_argv(args, port, mode.name, mode_dir / "replay"))
        if code != 0:
            raise RuntimeError(f"the replay exited with {code}")
        sweep = json.loads((mode_dir / "replay" / "sweep.json").read_text())
        result["rates"] = [summarize_run(r) for r in sweep["runs"]]
    except (RuntimeError, TimeoutError, OSError, ValueError) as e:
        result["error"] = str(e)
        result["log_tail"] = up.log.read_text(errors="replace")[-3000:]
        print(f"    {mode.name} failed: {e}\n{result['log_tail']}", flush=True)
    finally:
        up.stop()
    result["wall_s"] = round(time.monotonic() - started, 1)
    return result


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Serving benchmark — {s['model']}, {report['environment'].get('device', '')}", "",
             f"{s['num_requests']} requests of `{Path(s['trace']).name}` per rate, length scale "
             f"{s['length_scale']}, clipped to {s['clip_tokens']} tokens; Poisson {s['rates']} req/s; "
             f"SLO {s['slo']}; commit {report['environment'].get('commit', '?')}.", "",
             "| mode | rate | req/s served | TTFT p50 / p99 ms | TPOT p50 / p99 ms | goodput req/s | errors |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    f = lambda v, fmt=".0f": "—" if v is None else format(v, fmt)  # noqa: E731
    for mode in report["modes"]:
        if "error" in mode:
            lines.append(f"| {mode['mode']} | — | failed: {mode['error']} | | | | |")
            continue
        for r in mode["rates"]:
            lines.append(f"| {mode['mode']} | {r['rate']:g} | {f(r['req_per_s_served'], '.2f')} | "
                         f"{f(r['ttft_p50_ms'])} / {f(r['ttft_p99_ms'])} | {f(r['tpot_p50_ms'], '.1f')} / "
                         f"{f(r['tpot_p99_ms'], '.1f')} | {f(r['goodput_req_per_s'], '.2f')} | {r['errors']} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("req_per_s_served", "req/s served"), ("goodput_req_per_s", "goodput (req/s)"),
              ("ttft_p50_ms", "TTFT p50 (ms)"), ("ttft_p99_ms", "TTFT p99 (ms)"),
              ("tpot_p50_ms", "TPOT p50 (ms)"), ("tpot_p99_ms", "TPOT p99 (ms)")]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        for mode in report["modes"]:
            pts = [(r["rate"], r[key]) for r in mode.get("rates", []) if r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode["mode"])
        if key.startswith(("ttft", "tpot")):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("offered rate (req/s)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    s = report["settings"]
    fig.suptitle(f"{s['model']}: colocated vs disaggregated, SLO {s['slo']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving_gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "serving_gpu.md").write_text(markdown(report))
    plot(report, out / "serving_gpu.png")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serving_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="colocated,auto,zmq,ipc",
                   type=lambda t: [Mode.parse(m) for m in t.split(",") if m.strip()],
                   help="comma-separated: colocated, a connector name, CONNECTOR+adaptive")
    p.add_argument("--rates", default="2,4,8", help="Poisson req/s, comma-separated (all in one start per mode)")
    p.add_argument("--num-requests", type=int, default=100)
    traces = os.environ.get("KVFABRIC_TRACES") or Path(__file__).resolve().parents[2] / "shared" / "traces"
    p.add_argument("--trace", default=str(Path(traces) / "mooncake_conversation_trace_first_half.jsonl"),
                   help="Mooncake JSONL (default: $KVFABRIC_TRACES or ../shared/traces beside the checkout)")
    p.add_argument("--length-scale", type=float, default=0.5)
    p.add_argument("--clip-tokens", type=int, default=8192, help="input + output clipped to this")
    p.add_argument("--slo", default="ttft=1s,tpot=50ms")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured requests before each rate")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--model", default="preset:llama-3.1-8b")
    p.add_argument("--vocab-size", type=int, default=49152, help="prompt token ids are drawn below this")
    p.add_argument("--num-kv-blocks", type=int, default=12000)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-model-len", type=int, default=8448)
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--device", default=None, help="cuda (default where present) or cpu (a dry run)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--config", default=None, help="a kvfabric YAML config under the flags (e.g. DCP, tiers)")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--out", default="bench_results/serving_gpu", help="summary JSON, markdown and PNG")
    p.add_argument("--work", default=None, help="replay reports and up logs (default: OUT/work)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    if not Path(args.trace).is_file():
        print(f"bench.serving_gpu: no trace at {args.trace} (--trace)", file=sys.stderr)
        return 2
    settings = {k: v for k, v in vars(args).items() if k not in ("modes", "out", "work")}
    report = {"kind": KIND, "settings": {**settings, "modes": [m.name for m in args.modes]},
              "environment": {**environment(), "device": _device_name(args.device)}, "modes": []}
    for mode in args.modes:
        report["modes"].append(run_mode(args, mode, work))
        write(report, out)
        print(markdown(report), flush=True)
    return 0 if all("error" not in m for m in report["modes"]) else 1


def _device_name(device: str | None) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return "cpu"


if __name__ == "__main__":
    sys.exit(main())
