"""What every benchmark file carries: the commit, the date, the device, and the writers."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch


def git_commit() -> str:
    """KVFABRIC_COMMIT when set (the device machine's copy of the tree carries a stale .git), else git's."""
    if os.environ.get("KVFABRIC_COMMIT"):
        return os.environ["KVFABRIC_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("KVFABRIC_COMMIT", "unknown")


def environment(device: torch.device | None = None) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": git_commit(), "torch": torch.__version__, "python": platform.python_version(),
           "cpu_count": os.cpu_count(), "machine": platform.machine()}
    if device is not None and device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
    else:
        env["device"] = f"CPU ({os.cpu_count()} cores)"
    return env


def save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))


def save_plot(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
