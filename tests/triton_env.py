"""Where the Triton kernel tests run: on a CUDA device (``FULL``), or on the CPU through Triton's
interpreter (``TRITON_INTERPRET=1``) on smaller shapes; elsewhere they skip. Shared by every
kernel test module, with its ``pytestmark`` and the seeding and error measure they all use."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FULL = torch.cuda.is_available() and not INTERPRET
DEVICE = torch.device("cuda" if FULL else "cpu")
MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (FULL or INTERPRET), reason="needs CUDA, or TRITON_INTERPRET=1 for the interpreter"),
]
FULL_ONLY = pytest.mark.skipif(not FULL, reason="too large for the interpreter")


def seed(*params) -> None:
    """A fresh random draw for every parametrization, the same on every run."""
    torch.manual_seed(zlib.crc32(repr(params).encode()))


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64."""
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
