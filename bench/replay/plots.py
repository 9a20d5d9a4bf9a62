"""PNG plots of one or several replay runs: latency CDFs, throughput over time, goodput vs rate.

Every function takes ``[(label, run_report), ...]`` so a single run and a ``--compare`` of
colocated against disaggregated draw the same figures.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bench.replay.client import RequestRecord  # noqa: E402
from bench.replay.metrics import tpot  # noqa: E402

LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E"))


def records_of(run: dict) -> list[RequestRecord]:
    return [RequestRecord(**r) for r in run.get("requests", [])]


def latency_samples(run: dict) -> dict[str, np.ndarray]:
    ok = [r for r in records_of(run) if r.ok]
    return {"ttft": np.array([r.ttft_s for r in ok]),
            "tpot": np.array([t for t in map(tpot, ok) if t is not None]),
            "itl": np.array([x for r in ok for x in r.itl_s]),
            "e2e": np.array([r.e2e_s for r in ok])}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency_cdfs(runs: list[tuple[str, dict]], path: Path) -> Path:
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (key, title) in zip(axes, LATENCIES):
        largest = 0.0
        for label, run in runs:
            values = np.sort(latency_samples(run)[key]) * 1000.0
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=label)
                largest = max(largest, values[-1])
        slo = runs[0][1].get("metrics", {}).get("slo", {}).get(key) if runs else None
        if slo and slo * 1000.0 <= 2 * largest:  # a far-off SLO line would squash the curves
            ax.axvline(slo * 1000.0, color="grey", linestyle="--", linewidth=1, label=f"SLO {slo * 1000:g} ms")
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests (ITL: of gaps)")
    if axes[-1].get_legend_handles_labels()[0]:
        axes[-1].legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_throughput(runs: list[tuple[str, dict]], path: Path) -> Path:
    fig, (ax_tok, ax_req) = plt.subplots(1, 2, figsize=(12, 3.8))
    for label, run in runs:
        tl = run.get("timeline", {})
        ax_tok.plot(tl.get("t", []), tl.get("output_tokens_per_s", []), label=label)
        ax_req.plot(tl.get("t", []), tl.get("requests_per_s", []), label=label)
    ax_tok.set_title("output tokens/s over time")
    ax_req.set_title("completed requests/s over time")
    for ax in (ax_tok, ax_req):
        ax.set_xlabel("run time (s)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_goodput_vs_rate(series: list[tuple[str, list[dict]]], path: Path) -> Path:
    """``series``: label → run reports of one sweep (each with ``settings.rate``)."""
    fig, (ax_good, ax_att) = plt.subplots(1, 2, figsize=(12, 3.8))
    for label, runs in series:
        pts = sorted((r["settings"]["rate"], r["metrics"]["goodput"], r["metrics"]["slo_attainment"] or 0.0,
                      r["metrics"]["request_throughput"]) for r in runs)
        rates = [p[0] for p in pts]
        ax_good.plot(rates, [p[1] for p in pts], marker="o", label=f"{label} goodput")
        ax_good.plot(rates, [p[3] for p in pts], marker=".", linestyle=":", label=f"{label} throughput")
        ax_att.plot(rates, [100.0 * p[2] for p in pts], marker="o", label=label)
    ax_good.set_title("goodput vs request rate")
    ax_good.set_ylabel("requests/s")
    ax_att.set_title("SLO attainment vs request rate")
    ax_att.set_ylabel("% of requests")
    ax_att.set_ylim(0, 101)
    for ax in (ax_good, ax_att):
        ax.set_xlabel("offered rate (req/s)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _save(fig, path)
