"""Which GPU each engine ``kvfabric up`` starts runs on, and what fraction of it the engine may use.

Engines are laid onto the host's GPUs in order — prefill instances first, then every rank of every
decode instance — each taking the next GPU of its role's pool and wrapping around. The pool is
``prefill.gpus`` / ``decode.gpus`` when given (``--prefill-gpus 0 --decode-gpus 1``), else every
visible GPU. So with two GPUs prefill runs on GPU 0 and decode on GPU 1; with one, both share it.

A child sees its GPU as ``cuda:0`` through CUDA_VISIBLE_DEVICES, which lists its own GPU(s)
first and then the others (``1,0``), not its GPU alone: CUDA IPC and peer copies (the ``ipc``
connector) need the peer's GPU visible too. A decode instance of N DCP ranks gets its N GPUs
first (rank r uses ``cuda:r``).

Memory: each engine's KV budget is ``total GPU memory × its fraction − its own weights and
activations`` (engine/kv_budget.py), never what happens to be free while a neighbour loads. The
fraction is the role's ``gpu_memory_utilization``, else the engine section's, else 0.9 split
evenly among the engines that share its GPU (0.45 each for prefill and decode on one GPU).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

DEFAULT_UTILIZATION = 0.9


@dataclass
class Placement:
    gpus: list[str]  # this engine's GPUs, rank order; empty on CPU
    gpu_memory_utilization: float | None  # None: the engine's own default (CPU)

    def cuda_visible_devices(self, all_gpus: list[str]) -> str:
        return ",".join(self.gpus + [g for g in all_gpus if g not in self.gpus])


def parse_gpus(spec: str | int | list | None, where: str) -> list[str] | None:
    """"0,1" (or [0, 1]) -> ["0", "1"]; None/"" -> None (every visible GPU)."""
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(g) for g in spec)
    if spec is None or str(spec).strip() == "":
        return None
    gpus = [g.strip() for g in str(spec).split(",")]
    if any(not g for g in gpus) or len(set(gpus)) != len(gpus):
        raise ValueError(f"{where}: {spec!r} is not a comma-separated list of distinct GPU ids (e.g. '0' or '0,1')")
    return gpus


def visible_gpus(device: str) -> list[str]:
    """The GPU ids children can be given: CUDA_VISIBLE_DEVICES's, else 0..N-1; none for CPU."""
    if device == "cpu":
        return []
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def place(all_gpus: list[str], roles: list[tuple[str, int, int, list[str] | None, float | None]],
          engine_utilization: float | None) -> dict[str, list[Placement]]:
    """``roles``: (name, instances, ranks per instance, pool or None, role's fraction or None) in
    start order. Returns each role's placements, one per instance."""
    if not all_gpus:
        return {name: [Placement([], utilization if utilization is not None else engine_utilization)
                       for _ in range(n)] for name, n, _, _, utilization in roles}
    for name, _, _, pool, _ in roles:
        unknown = [g for g in pool or [] if g not in all_gpus]
        if unknown:
            raise ValueError(f"{name} GPUs {unknown} are not visible here (visible: {','.join(all_gpus)})")
    claimed = {g for _, _, _, pool, _ in roles for g in pool or []}
    unclaimed = [g for g in all_gpus if g not in claimed] or all_gpus
    cursor: Counter = Counter()  # next slot of each pool
    out: dict[str, list[Placement]] = {}
    for name, n, ranks, pool, utilization in roles:
        pool = pool or unclaimed  # a role without GPUs of its own avoids those given to another
        key = tuple(pool)
        if ranks > len(pool):
            raise ValueError(f"a {name} instance needs {ranks} GPUs (dcp_size); its pool has {len(pool)}")
        placed = []
        for _ in range(n):
            gpus = [pool[(cursor[key] + r) % len(pool)] for r in range(ranks)]
            cursor[key] += ranks
            placed.append(Placement(gpus, utilization))
        out[name] = placed
    sharing = Counter(g for placed in out.values() for p in placed for g in p.gpus)
    for placed in out.values():
        for p in placed:
            if p.gpu_memory_utilization is None:
                p.gpu_memory_utilization = engine_utilization or DEFAULT_UTILIZATION / max(sharing[g] for g in p.gpus)
    over = {g: round(sum(p.gpu_memory_utilization for placed in out.values() for p in placed if g in p.gpus), 3)
            for g in sharing}
    over = {g: total for g, total in over.items() if total > 1.0}
    if over:
        raise ValueError(f"the engines sharing GPU(s) {over} would use more than all of its memory "
                         "(sum of gpu_memory_utilization > 1): lower it, or give prefill and decode their own GPUs")
    return out
