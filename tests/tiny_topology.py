"""A real ``kvfabric up`` topology on a tiny random model: fast enough on two shared CPU cores for
tests that send many requests (limits, fuzzing, hardening, fault injection)."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.topology import Topology

MAX_MODEL_LEN = 512  # the tiny presets' max_position_embeddings


def tiny_topology(workdir: Path, model_dir: Path, colocated: bool = True, proxy: dict | None = None,
                  **kwargs) -> Topology:
    """A Topology serving ``model_dir`` (made with_tokenizer), with ``proxy`` settings merged in."""
    topo = Topology(workdir, colocated=colocated,
                    engine={"max_model_len": MAX_MODEL_LEN, "kv_cache_bytes": 32 << 20, **kwargs.pop("engine", {})},
                    extra={"model": str(model_dir), **kwargs.pop("extra", {})}, **kwargs)
    cfg = yaml.safe_load(topo.config_path.read_text())
    cfg["proxy"].update(proxy or {})
    topo.config_path.write_text(yaml.safe_dump(cfg))
    return topo
