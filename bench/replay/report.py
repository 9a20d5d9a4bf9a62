"""Replay reports: one JSON (settings, environment, endpoint, metrics, every request), a markdown
summary, and PNG plots; for a single run, a ``--sweep`` of rates, or a ``--compare`` of runs.

A run report is self-contained: a sweep report is a list of run reports, and ``--compare``
accepts either kind, so colocated and disaggregated runs made on different days still merge.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

from bench.replay import plots

RUN_KIND, SWEEP_KIND, COMPARE_KIND = "kvfabric.bench.replay.run", "kvfabric.bench.replay.sweep", "kvfabric.bench.replay.compare"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("KVFABRIC_COMMIT", "unknown")


def environment() -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "client_host": platform.node(), "python": platform.python_version()}


# ---------------------------------------------------------------- markdown

def _ms(value) -> str:
    return "–" if value is None else f"{value * 1000:.1f}"


def _num(value, fmt=".2f") -> str:
    return "–" if value is None else format(value, fmt)


def _pct(fraction) -> str:
    return "–" if fraction is None else f"{100 * fraction:.1f}%"


def _slo_text(slo: dict) -> str:
    return ", ".join(f"{k} ≤ {v * 1000:g} ms" for k, v in slo.items()) or "none"


def _scaling_text(s: dict) -> str:
    timing = f"Poisson at {s['rate']:g} req/s" if s.get("rate") else f"trace arrivals × {s['time_scale']:g}"
    return (f"lengths × {s['length_scale']:g}, {s['block_tokens']} tokens per hash block "
            f"(trace: {s['trace_block_tokens']}), {timing}")


def run_markdown(run: dict, plot_names: dict[str, str] | None = None) -> str:
    s, m, env, ep = run["settings"], run["metrics"], run["environment"], run["endpoint"]
    lines = [f"# kvfabric bench replay — {run['label']}", "",
             f"- date {env['date']}, commit `{env['commit']}`, client {env['client_host']}",
             f"- endpoint {ep['url']} (model `{ep['model']}`; served: {', '.join(ep.get('models') or ['?'])})",
             f"- trace `{s['trace']}` ({s['trace_format']}, {s['trace_requests']} requests), "
             f"slice start {s['start']}, {m['requests']} sent, warm-up {s['warmup']}",
             f"- scaling: {_scaling_text(s)}; prompts as {s['prompt_format']}"
             + (f"; {run['prompts']['clipped']} clipped to {s['max_model_len']}" if s.get("max_model_len") else ""),
             f"- max concurrency {s['max_concurrency'] or 'unlimited'}, duration limit "
             f"{s['duration_s'] or 'none'}, SLO {_slo_text(m['slo'])}", "",
             "| latency (ms) | mean | p50 | p90 | p99 |", "| --- | ---: | ---: | ---: | ---: |"]
    for key, title in plots.LATENCIES:
        st = m[key]
        lines.append(f"| {title} | {_ms(st['mean'])} | {_ms(st['p50'])} | {_ms(st['p90'])} | {_ms(st['p99'])} |")
    lines += ["", "| requests | completed | failed | duration (s) | req/s | output tok/s | goodput (req/s) | SLO attainment |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
              f"| {m['requests']} | {m['completed']} | {m['failed']} | {m['duration_s']:.1f} | "
              f"{m['request_throughput']:.2f} | {m['output_throughput']:.1f} | {m['goodput']:.2f} | "
              f"{_pct(m['slo_attainment'])} |", ""]
    if m["errors"]:
        lines += ["Errors by kind: " + ", ".join(f"`{k}` × {v}" for k, v in m["errors"].items()), ""]
    if run.get("unsent_after_duration"):
        lines += [f"{run['unsent_after_duration']} request(s) scheduled after the duration limit were not sent.", ""]
    if m["short_outputs"]:
        lines += [f"{m['short_outputs']} completed request(s) returned fewer tokens than max_tokens.", ""]
    lines += _server_lines(run.get("server_metrics", {}))
    for title, name in (plot_names or {}).items():
        lines.append(f"![{title}]({name})")
    return "\n".join(lines) + "\n"


def _server_lines(server: dict) -> list[str]:
    if not server.get("available"):
        return ["Server counters: /metrics not available.", ""]
    moved = {k: v for k, v in server["counters"].items() if v}
    if not moved and not server["hit_rates"]:
        return ["Server counters: none of `kvfabric_*` / `vllm:*` changed.", ""]
    lines = ["| server counter (delta over the run) | value |", "| --- | ---: |"]
    lines += [f"| `{k}` | {v:.4g} |" for k, v in sorted(moved.items())]
    lines += [f"| `{k}` | {100 * v:.1f}% |" for k, v in sorted(server["hit_rates"].items())]
    return lines + [""]


def comparison_markdown(runs: list[tuple[str, dict]], plot_names: dict[str, str]) -> str:
    lines = ["# kvfabric bench replay — comparison", "",
             "| run | rate | req/s | out tok/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | ITL p99 | E2E p50 "
             "| goodput | SLO att. | errors |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, run in runs:
        m, s = run["metrics"], run["settings"]
        lines.append(f"| {label} | {_num(s.get('rate'), 'g') if s.get('rate') else 'trace'} | "
                     f"{m['request_throughput']:.2f} | {m['output_throughput']:.1f} | {_ms(m['ttft']['p50'])} | "
                     f"{_ms(m['ttft']['p99'])} | {_ms(m['tpot']['p50'])} | {_ms(m['tpot']['p99'])} | "
                     f"{_ms(m['itl']['p99'])} | {_ms(m['e2e']['p50'])} | {m['goodput']:.2f} | {_pct(m['slo_attainment'])} | {m['failed']} |")
    lines += ["", "Latencies in ms. Settings of each run:", ""]
    for label, run in runs:
        s, ep, env = run["settings"], run["endpoint"], run["environment"]
        lines.append(f"- **{label}**: {ep['url']} `{ep['model']}`, commit `{env['commit']}`, {env['date']}; "
                     f"trace `{s['trace']}`; {_scaling_text(s)}; SLO {_slo_text(run['metrics']['slo'])}")
    lines.append("")
    lines += [f"![{title}]({name})" for title, name in plot_names.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- writers

def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))


def write_run(run: dict, out_dir: Path, stem: str = "replay", with_plots: bool = True) -> dict[str, Path]:
    """``stem.json``, ``stem.md`` and (unless a sweep draws them all together) two PNGs."""
    out_dir = Path(out_dir)
    files = {"json": out_dir / f"{stem}.json"}
    if with_plots:
        one = [(run["label"], run)]
        files["latency_cdf"] = plots.plot_latency_cdfs(one, out_dir / f"{stem}_latency_cdf.png")
        files["throughput"] = plots.plot_throughput(one, out_dir / f"{stem}_throughput.png")
    _write_json(files["json"], run)
    files["markdown"] = out_dir / f"{stem}.md"
    names = {"latency CDFs": "latency_cdf", "throughput over time": "throughput"}
    files["markdown"].write_text(run_markdown(run, {t: files[k].name for t, k in names.items() if k in files}))
    return files


def sweep_report(runs: list[dict]) -> dict:
    first = runs[0]
    return {"kind": SWEEP_KIND, "label": first["label"], "environment": first["environment"],
            "endpoint": first["endpoint"], "rates": [r["settings"]["rate"] for r in runs], "runs": runs}


def write_sweep(sweep: dict, out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    labelled = [(f"{r['settings']['rate']:g} req/s", r) for r in sweep["runs"]]
    files = {"json": out_dir / "sweep.json",
             "goodput": plots.plot_goodput_vs_rate([(sweep["label"], sweep["runs"])], out_dir / "sweep_goodput.png"),
             "latency_cdf": plots.plot_latency_cdfs(labelled, out_dir / "sweep_latency_cdf.png"),
             "throughput": plots.plot_throughput(labelled, out_dir / "sweep_throughput.png")}
    _write_json(files["json"], sweep)
    files["markdown"] = out_dir / "sweep.md"
    text = comparison_markdown(labelled, {"goodput vs rate": files["goodput"].name,
                                          "latency CDFs": files["latency_cdf"].name,
                                          "throughput over time": files["throughput"].name})
    files["markdown"].write_text(text.replace("— comparison", f"— sweep, {sweep['label']}", 1))
    return files


def load_report(path: str | Path) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("kind") not in (RUN_KIND, SWEEP_KIND):
        raise ValueError(f"{path}: not a replay run or sweep report (kind {data.get('kind')!r})")
    return data


def write_comparison(paths: list[str | Path], out_dir: Path) -> dict[str, Path]:
    """Merge run and sweep reports into one table and one set of plots; each input keeps its
    label (its file name where labels collide)."""
    reports = [(Path(p), load_report(p)) for p in paths]
    labels = [rep["label"] for _, rep in reports]
    named = [(rep["label"] if labels.count(rep["label"]) == 1 else f"{rep['label']} ({p.stem})", rep)
             for p, rep in reports]
    runs, sweeps = [], []
    for label, rep in named:
        if rep["kind"] == SWEEP_KIND:
            sweeps.append((label, rep["runs"]))
            runs += [(f"{label} @ {r['settings']['rate']:g}", r) for r in rep["runs"]]
        else:
            runs.append((label, rep))
    out_dir = Path(out_dir)
    files = {"latency_cdf": plots.plot_latency_cdfs(runs, out_dir / "compare_latency_cdf.png"),
             "throughput": plots.plot_throughput(runs, out_dir / "compare_throughput.png")}
    names = {"latency CDFs": files["latency_cdf"].name, "throughput over time": files["throughput"].name}
    if sweeps:
        files["goodput"] = plots.plot_goodput_vs_rate(sweeps, out_dir / "compare_goodput.png")
        names["goodput vs rate"] = files["goodput"].name
    files["json"] = out_dir / "compare.json"
    _write_json(files["json"], {"kind": COMPARE_KIND, "environment": environment(),
                                "inputs": [str(p) for p, _ in reports],
                                "runs": [{"label": label, "settings": r["settings"], "endpoint": r["endpoint"],
                                          "environment": r["environment"], "metrics": r["metrics"]}
                                         for label, r in runs]})
    files["markdown"] = out_dir / "compare.md"
    files["markdown"].write_text(comparison_markdown(runs, names))
    return files
