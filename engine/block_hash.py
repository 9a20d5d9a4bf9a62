"""Block identity: the chained hash that names a full block of KV anywhere in kvfabric.

A full block of ``block_size`` tokens is named by

    hash_0 = hash_block(seed, tokens[0:B])
    hash_i = hash_block(hash_{i-1}, tokens[i*B:(i+1)*B])

where ``seed = model_hash_seed(model_id, dtype, block_size, layout)``. Chaining makes a block's
name depend on every token before it (KV at a position depends on the whole prefix), and the seed
makes it depend on the model and the KV format, so two engines agree on a key exactly when
their bytes for that block would be identical. The same keys are used by the engine's prefix
cache, every storage tier and every connector, so they must be stable across processes, Python
versions and machines: BLAKE2b over an explicit little-endian encoding, never Python's ``hash()``
(salted per process).

Only full blocks are hashed: a partial block's content is still growing.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from typing import Any

BLOCK_HASH_BYTES = 32  # 256 bits: collisions are not a practical concern even across fleets
_SEED_PERSON = b"kvfabric-seed-v1"  # BLAKE2b personalisation (<= 16 bytes): seeds and blocks
_BLOCK_PERSON = b"kvfabric-blk-v1"  # live in separate domains, so one can never equal the other


def model_hash_seed(model_id: str, dtype: str, block_size: int, layout: str) -> bytes:
    """The root of every hash chain: the identity of the model and of the KV format.

    Anything that changes the bytes of a block must be in here; a change of any field yields
    unrelated keys, so a cache can never serve KV computed by another model or in another layout.
    """
    # JSON of a fixed-order list is an unambiguous encoding (no "a"+"bc" == "ab"+"c" aliasing).
    ident = json.dumps([model_id, dtype, int(block_size), layout], separators=(",", ":"))
    return hashlib.blake2b(ident.encode(), digest_size=BLOCK_HASH_BYTES, person=_SEED_PERSON).digest()


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """Hash of one block given its parent's hash (or the seed, for the first block)."""
    if len(parent) != BLOCK_HASH_BYTES:
        raise ValueError(f"parent hash must be {BLOCK_HASH_BYTES} bytes, got {len(parent)}")
    h = hashlib.blake2b(parent, digest_size=BLOCK_HASH_BYTES, person=_BLOCK_PERSON)
    # Fixed-width little-endian int64: identical bytes on every machine, any vocabulary size.
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def extend_block_hashes(request: Any, block_size: int, seed: bytes) -> None:
    """Append to ``request.block_hashes`` the hashes of full blocks completed since the last call.

    Incremental: costs one hash per new full block, nothing per already-hashed block, so calling
    it every step is cheap. ``request`` is duck-typed (``prompt_token_ids``, ``output_token_ids``,
    ``block_hashes``) so connectors and benchmarks can pass their own light objects.
    """
    hashes: list[bytes] = request.block_hashes
    prompt, output = request.prompt_token_ids, request.output_token_ids
    num_prompt = len(prompt)
    num_full = (num_prompt + len(output)) // block_size
    parent = hashes[-1] if hashes else seed
    for i in range(len(hashes), num_full):
        start, end = i * block_size, (i + 1) * block_size
        # Slice the two lists directly: ``all_token_ids`` would copy the whole sequence per block.
        if end <= num_prompt:
            tokens = prompt[start:end]
        elif start >= num_prompt:
            tokens = output[start - num_prompt:end - num_prompt]
        else:
            tokens = prompt[start:] + output[:end - num_prompt]
        parent = hash_block(parent, tokens)
        hashes.append(parent)


def block_hash_to_hex(block_hash: bytes) -> str:
    """Text form of a key for JSON (``kv_transfer_params``), file names and logs."""
    return block_hash.hex()


def block_hash_from_hex(text: str) -> bytes:
    """Inverse of ``block_hash_to_hex``; rejects strings that cannot be a block hash."""
    block_hash = bytes.fromhex(text)
    if len(block_hash) != BLOCK_HASH_BYTES:
        raise ValueError(f"a block hash is {BLOCK_HASH_BYTES} bytes, got {len(block_hash)}")
    return block_hash
