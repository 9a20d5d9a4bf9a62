"""Duck-typed engine requests for connector tests: what a connector reads off a Request."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

BS = 4


def chain_hashes(token_ids: list[int], seed: bytes = b"tiny", block_size: int = BS) -> list[bytes]:
    """Chained hashes of the full blocks, as engine/block_hash.py names them (any chain will do here)."""
    out, parent = [], hashlib.sha256(seed).digest()
    for i in range(len(token_ids) // block_size):
        parent = hashlib.sha256(parent + repr(token_ids[i * block_size:(i + 1) * block_size]).encode()).digest()
        out.append(parent)
    return out


@dataclass
class FakeRequest:
    request_id: str
    prompt_token_ids: list[int]
    num_computed_tokens: int = 0
    kv_transfer_params: dict | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: object = None
    block_hashes: list[bytes] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


@dataclass
class HashedRequest(FakeRequest):
    """A request whose full prompt blocks are already hashed, as the scheduler leaves them."""

    def __post_init__(self) -> None:
        self.block_hashes = chain_hashes(self.prompt_token_ids)
