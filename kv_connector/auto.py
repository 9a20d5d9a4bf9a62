"""``kv_connector: auto``: the transport that follows the topology, decided once for both sides.

- **One host** (the producer's advertised address is one of this machine's, as the consumer's
  is): ``ipc`` — CUDA IPC GPU→GPU when there is a GPU, the producer's host cache shared in
  memory otherwise (docs/connectors.md has the figures). It needs a writable /dev/shm.
- **Across hosts**: ``nixl``, then ``ucx``, whichever imports and starts here (a NIXL agent, a
  UCX worker): one-sided RDMA or UCX's best transport between the two.
- **zmq** only when nothing else works: TCP, everywhere.

Producer and consumer must agree, so the choice is made from what both share: ``kvfabric up``
resolves it once and writes the concrete name into the one config every engine reads;
``kvfabric serve`` resolves it from the same config sections (``prefill.host`` or
``advertise_host``, ``decode.host``) on each side. A producer also names its connector in every
request's ``kv_transfer_params``; a consumer that was configured otherwise fails that load, which
``kv_load_failure_policy: recompute`` turns into a local prefill — never a client error.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import os
import socket
import tempfile
from typing import Callable

logger = logging.getLogger(__name__)

_TRANSPORT_MODULES = {"nixl": ("nixl", "nixl_cu13", "nixl_cu12"), "ucx": ("ucxx",)}


def local_addresses() -> set[str]:
    """This machine's names and addresses (loopback included), as far as resolving them tells."""
    names = {"localhost", "0.0.0.0", "", "*", socket.gethostname(), socket.getfqdn()}
    addrs = set(names)
    for name in names - {"", "*", "0.0.0.0"}:
        try:
            addrs.update(info[4][0] for info in socket.getaddrinfo(name, None))
        except OSError:
            pass
    return addrs


def is_local(host: str, here: set[str] | None = None) -> bool:
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    return host in (here if here is not None else local_addresses())


def shm_works() -> bool:
    """Whether shared memory segments can be made here (ipc's host cache, rings, hold boards)."""
    shm = "/dev/shm"
    if not os.path.isdir(shm):
        return False
    try:
        with tempfile.NamedTemporaryFile(dir=shm, prefix="kvfabric-probe-"):
            return True
    except OSError:
        return False


def transport_works(name: str) -> bool:
    """Whether ``nixl``/``ucx`` imports here (its module is found and its library loads)."""
    mods = [m for m in _TRANSPORT_MODULES[name] if importlib.util.find_spec(m) is not None]
    for mod in mods:
        try:
            importlib.import_module(mod)
            return True
        except Exception as e:  # noqa: BLE001 - a broken native library is "does not work"
            logger.debug("%s: %s does not import: %s", name, mod, e)
    return False


def choose_connector(producer_host: str, consumer_host: str, cuda: bool | None = None,
                     works: Callable[[str], bool] | None = None) -> tuple[str, str]:
    """(connector name, why) for a producer advertised at ``producer_host`` and a consumer at
    ``consumer_host``. ``works(name)`` says whether a transport works here (tests pass their own)."""
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    works = works or (lambda n: shm_works() if n == "ipc" else transport_works(n))
    here = local_addresses()
    same_host = is_local(producer_host, here) and is_local(consumer_host, here)
    tried = []
    if same_host:
        if works("ipc"):
            how = "CUDA IPC GPU→GPU" if cuda else "the producer's host cache shared in memory"
            return "ipc", f"prefill ({producer_host}) and decode ({consumer_host}) share this host: {how}"
        tried.append("ipc (no usable /dev/shm)")
    else:
        for name in ("nixl", "ucx"):
            if works(name):
                return name, (f"prefill ({producer_host}) and decode ({consumer_host}) are on different hosts: "
                              f"{name} is the fastest transport that works here")
            tried.append(f"{name} (not installed or not working)")
    return "zmq", "TCP, the transport that always works; unavailable: " + ", ".join(tried)


def resolve_auto(spec: dict, producer_host: str, consumer_host: str) -> tuple[dict, str | None]:
    """``spec`` (a kv_transfer_config) with ``auto`` replaced by a concrete name, and the log line
    saying why (None when the connector was named)."""
    if spec.get("kv_connector", "auto") != "auto":
        return spec, None
    advertised = (spec.get("kv_connector_extra_config") or {}).get("advertise_host") or producer_host
    name, why = choose_connector(advertised, consumer_host)
    return {**spec, "kv_connector": name}, f"kv_connector auto → {name} because {why}"
