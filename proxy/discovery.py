"""The proxy's instance set, replaced at run time from a watched JSON file.

A launcher that places engines itself (``kvfabric up --ray``) writes
``{"prefill": ["host:port", ...], "decode": [...], "colocated": [...]}`` to a file (atomically:
write a sibling, then rename) and passes it as ``--instances-file``. The proxy re-reads it when
it changes: an address that stays keeps its connection, health and in-flight count; a new one
joins out of rotation until its first health check passes; one that goes is taken out of rotation
at once and its channel closed when its last request ends, so scaling down loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from pathlib import Path

from proxy.instance import Instance

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "colocated")


def read_instances(path: str | os.PathLike) -> dict[str, list[str]]:
    """The file's address lists; a clear error for anything else."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or set(data) - set(ROLES):
        raise ValueError(f"{path}: expected an object with keys among {ROLES}, got {data!r}")
    out = {role: data.get(role, []) for role in ROLES}
    for role, addrs in out.items():
        if not isinstance(addrs, list) or not all(isinstance(a, str) and a.rpartition(":")[2].isdigit()
                                                  for a in addrs):
            raise ValueError(f"{path}: {role} must be a list of 'host:port' strings, got {addrs!r}")
    return out


async def apply_instances(router, sets: dict[str, list[str]], health_timeout_s: float) -> None:
    """Make the router's instance lists equal ``sets``, keeping the instances that stay."""
    added: list[Instance] = []
    for role in ROLES:
        current = {i.address: i for i in getattr(router, role)}
        kept = [current.pop(a) if a in current else Instance(a, role) for a in dict.fromkeys(sets[role])]
        added += [i for i in kept if i.address not in {j.address for j in getattr(router, role)}]
        setattr(router, role, kept)
        for gone in current.values():
            gone.mark_unhealthy("removed from the instance set")
            asyncio.create_task(_close_when_idle(gone), name=f"kvfabric-retire-{gone.address}")
        if current or any(i in added for i in kept):
            logger.info("%s instances now %s", role, [i.address for i in kept])
    await asyncio.gather(*(i.check_health(health_timeout_s) for i in added))


async def _close_when_idle(instance: Instance) -> None:
    while instance.in_flight:
        await asyncio.sleep(0.2)
    await instance.close()


class InstanceFileWatcher:
    """Polls the file's modification time; a file that cannot be read keeps the current set."""

    def __init__(self, path: str, router, interval_s: float = 0.5, health_timeout_s: float = 2.0) -> None:
        self.path, self.router = path, router
        self.interval_s, self.health_timeout_s = interval_s, health_timeout_s
        self._seen: tuple[int, int] | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.poll()
        self._task = asyncio.create_task(self._loop(), name="kvfabric-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def poll(self) -> None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._seen:
                return
            sets = read_instances(self.path)
        except (OSError, ValueError) as e:
            logger.warning("instance file %s not applied: %s", self.path, e)
            return
        self._seen = stamp
        await apply_instances(self.router, sets, self.health_timeout_s)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.poll()
            except Exception:  # a bug here must not stop discovery for good
                logger.exception("instance file poll failed")


def write_instances(path: str | os.PathLike, sets: dict[str, list[str]]) -> None:
    """Atomically replace the file (the watcher never reads half of it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({role: list(sets.get(role, [])) for role in ROLES}))
    os.replace(tmp, path)
