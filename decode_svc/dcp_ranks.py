"""A decode instance's context-parallel ranks: this process is rank 0, ranks 1..N-1 are its children.

``launch_dcp_group(engine_config, N)`` starts the workers (``python -m decode_svc.dcp_ranks``),
joins them in a torch.distributed group (NCCL when the engine runs on CUDA, one GPU per rank:
rank r uses ``cuda:r``; gloo on CPU) and returns the group for rank 0's ``LLMEngine``. Each
worker builds the same engine from the same EngineConfig (sent as JSON on its command line)
and runs the driver's steps until ``LLMEngine.shutdown`` on rank 0 tells it to stop. Workers
die with rank 0 (PR_SET_PDEATHSIG), so a killed server leaves no orphan holding a GPU.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, replace

import torch

from engine.config import EngineConfig
from engine.dcp_group import DCPGroup

logger = logging.getLogger(__name__)


def rank_device(device: str, rank: int) -> str:
    """The device of ``rank``: GPU r of this host when the engine runs on CUDA."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{rank}" if device in ("cuda", "cuda:0") else device


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (no orphans)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class DCPLaunch:
    group: DCPGroup
    engine_config: EngineConfig  # rank 0's: the device pinned to cuda:0 on GPU hosts
    workers: list[subprocess.Popen]

    def wait(self, timeout: float = 30.0) -> None:
        """After rank 0's engine shut down (which tells the workers to stop): reap them."""
        for p in self.workers:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("DCP worker pid %d did not stop; killing it", p.pid)
                p.kill()
                p.wait()


def launch_dcp_group(engine_config: EngineConfig, size: int, host: str = "127.0.0.1") -> DCPLaunch:
    if size < 2:
        raise ValueError(f"a DCP group needs at least 2 ranks, got {size}")
    device = rank_device(engine_config.device, 0)
    if device.startswith("cuda") and torch.cuda.device_count() < size:
        raise ValueError(f"dcp_size {size} needs {size} GPUs on this host; {torch.cuda.device_count()} visible")
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    init = f"tcp://{host}:{port}"
    cfg_json = json.dumps(asdict(engine_config))
    workers = [subprocess.Popen([sys.executable, "-m", "decode_svc.dcp_ranks", "--rank", str(r), "--size", str(size),
                                 "--init", init, "--engine-config", cfg_json], preexec_fn=die_with_parent)
               for r in range(1, size)]
    try:
        group = DCPGroup(0, size, init, torch.device(device))
    except BaseException:
        for p in workers:
            p.kill()
        raise
    return DCPLaunch(group, replace(engine_config, device=device), workers)


def main(argv: list[str] | None = None) -> int:
    from engine.llm_engine import LLMEngine

    p = argparse.ArgumentParser(description="one worker rank of a DCP decode instance (started by rank 0)")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--init", required=True, help="torch.distributed init method, tcp://host:port")
    p.add_argument("--engine-config", required=True, help="EngineConfig as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s dcp-rank{args.rank} %(levelname)s %(message)s")
    cfg = EngineConfig(**json.loads(args.engine_config))
    cfg.device = rank_device(cfg.device, args.rank)
    cfg.kv_events_config = None  # rank 0 publishes the group's KV events (its block pool is the group's)
    group = DCPGroup(args.rank, args.size, args.init, cfg.torch_device())
    engine = LLMEngine(cfg, dcp_group=group)
    engine.runner.serve_worker()
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
