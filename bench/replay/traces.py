"""Request traces: Mooncake JSONL, Azure LLM inference CSV, and a synthetic generator.

Every loader yields the same ``TraceRequest``: arrival time in seconds from the first request,
input and output lengths in tokens, and the prefix-block hash ids (empty where the trace has
none). Hash ids follow Mooncake's convention: one id per ``TRACE_BLOCK_TOKENS``-token block of
the prompt, and equal leading ids mean a shared prefix.

A file that cannot be read raises ``TraceError`` naming the file and the 1-based line, because
a trace of thousands of lines with one bad row is otherwise hopeless to fix.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TRACE_BLOCK_TOKENS = 512  # Mooncake's hash-block size; synthetic traces use the same


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()


@dataclass
class Trace:
    """The requests of one trace, sorted by arrival, and where they came from."""

    source: str
    format: str
    requests: list[TraceRequest] = field(default_factory=list)


class TraceError(ValueError):
    def __init__(self, path: str | Path, line: int, message: str):
        self.path, self.line = str(path), line
        super().__init__(f"{path}:{line}: {message}")


def _int_field(path, line, row: dict, name: str) -> int:
    if name not in row or row[name] in (None, ""):
        raise TraceError(path, line, f"missing field {name!r}")
    value = row[name]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TraceError(path, line, f"field {name!r} is not a number: {value!r}") from None
    if not math.isfinite(number) or number < 0 or number != int(number):
        raise TraceError(path, line, f"field {name!r} must be a non-negative integer: {value!r}")
    return int(number)


def _float_field(path, line, row: dict, name: str) -> float:
    if name not in row or row[name] in (None, ""):
        raise TraceError(path, line, f"missing field {name!r}")
    try:
        number = float(row[name])
    except (TypeError, ValueError):
        raise TraceError(path, line, f"field {name!r} is not a number: {row[name]!r}") from None
    if not math.isfinite(number):
        raise TraceError(path, line, f"field {name!r} is not finite: {row[name]!r}")
    return number


def _normalised(requests: list[TraceRequest]) -> list[TraceRequest]:
    requests.sort(key=lambda r: r.arrival_s)
    t0 = requests[0].arrival_s if requests else 0.0
    return [TraceRequest(r.arrival_s - t0, r.input_len, r.output_len, r.hash_ids) for r in requests]


def load_mooncake(path: str | Path) -> Trace:
    """Mooncake JSONL: ``timestamp`` (ms), ``input_length``, ``output_length``, ``hash_ids``."""
    requests = []
    with open(path, encoding="utf-8") as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise TraceError(path, line_no, f"not JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise TraceError(path, line_no, "not a JSON object")
            hash_ids = row.get("hash_ids", [])
            if not isinstance(hash_ids, list) or not all(isinstance(h, int) and not isinstance(h, bool)
                                                         for h in hash_ids):
                raise TraceError(path, line_no, "field 'hash_ids' must be a list of integers")
            requests.append(TraceRequest(
                arrival_s=_float_field(path, line_no, row, "timestamp") / 1000.0,
                input_len=_int_field(path, line_no, row, "input_length"),
                output_len=_int_field(path, line_no, row, "output_length"),
                hash_ids=tuple(hash_ids)))
    return Trace(str(path), "mooncake", _normalised(requests))


def _parse_timestamp(path, line, value: str | None) -> tuple[datetime.datetime, float]:
    """A wall-clock time as (datetime to the microsecond, the remaining fraction in seconds):
    Azure writes 7 fractional digits, Python parses 6, and a float of epoch seconds would lose
    the sub-microsecond part anyway."""
    if not value:
        raise TraceError(path, line, "missing field 'TIMESTAMP'")
    try:
        base, _, frac = value.strip().partition(".")
        if frac and not frac.isdigit():
            raise ValueError(frac)
        when = datetime.datetime.fromisoformat(base)
        micros = int((frac + "000000")[:6])
        below_us = float("0." + frac[6:]) * 1e-6 if len(frac) > 6 else 0.0
        return when + datetime.timedelta(microseconds=micros), below_us
    except ValueError:
        raise TraceError(path, line, f"field 'TIMESTAMP' is not a date-time: {value!r}") from None


def load_azure(path: str | Path) -> Trace:
    """Azure LLM inference CSV: ``TIMESTAMP`` (wall clock), ``ContextTokens``, ``GeneratedTokens``."""
    requests, base = [], None
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or [])
        if missing:
            raise TraceError(path, 1, f"header lacks column(s) {sorted(missing)}")
        for row in reader:
            line_no = reader.line_num
            if None in row:
                raise TraceError(path, line_no, "more fields than the header names")
            when, sub_us = _parse_timestamp(path, line_no, row["TIMESTAMP"])
            base = base or when
            requests.append(TraceRequest(
                arrival_s=(when - base).total_seconds() + sub_us,
                input_len=_int_field(path, line_no, row, "ContextTokens"),
                output_len=_int_field(path, line_no, row, "GeneratedTokens")))
    return Trace(str(path), "azure", _normalised(requests))


@dataclass
class SyntheticSpec:
    """``synthetic:n=500,rate=4,cv=1,input=1024,output=128,dist=lognormal,sigma=0.5,groups=8,prefix=512``.

    Arrivals are gamma-distributed gaps with mean ``1/rate`` and coefficient of variation ``cv``
    (``cv=1`` is Poisson; larger is burstier). Lengths are ``fixed``, ``uniform`` (±50%) or
    ``lognormal`` (with ``sigma``) around their means. Each request joins one of ``groups``
    shared-prefix groups whose first ``prefix`` tokens are common; ``groups=0`` shares nothing.
    """

    n: int = 200
    rate: float = 4.0
    cv: float = 1.0
    input: int = 1024
    output: int = 128
    dist: str = "lognormal"
    sigma: float = 0.5
    groups: int = 0
    prefix: int = 512
    seed: int = 0

    @classmethod
    def parse(cls, spec: str) -> "SyntheticSpec":
        body = spec.split(":", 1)[1] if ":" in spec else ""
        out = cls()
        for item in filter(None, (s.strip() for s in body.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not hasattr(out, key):
                raise ValueError(f"synthetic trace: unknown setting {item!r} (known: {list(vars(cls()))})")
            kind = type(getattr(cls(), key))
            setattr(out, key, kind(value))
        if out.dist not in ("fixed", "uniform", "lognormal"):
            raise ValueError(f"synthetic trace: dist must be fixed, uniform or lognormal, not {out.dist!r}")
        if out.rate <= 0 or out.cv <= 0 or out.n <= 0:
            raise ValueError("synthetic trace: n, rate and cv must be positive")
        return out

    def _lengths(self, rng: np.random.Generator, mean: int) -> np.ndarray:
        if self.dist == "fixed":
            values = np.full(self.n, float(mean))
        elif self.dist == "uniform":
            values = rng.uniform(0.5 * mean, 1.5 * mean, self.n)
        else:  # lognormal with the requested mean
            values = rng.lognormal(math.log(mean) - self.sigma ** 2 / 2, self.sigma, self.n)
        return np.maximum(1, np.rint(values)).astype(int)

    def generate(self) -> Trace:
        rng = np.random.default_rng(self.seed)
        shape = 1.0 / self.cv ** 2
        gaps = rng.gamma(shape, 1.0 / (self.rate * shape), self.n)
        gaps[0] = 0.0
        arrivals = np.cumsum(gaps)
        inputs, outputs = self._lengths(rng, self.input), self._lengths(rng, self.output)
        group_of = rng.integers(0, self.groups, self.n) if self.groups > 0 else None
        prefix_blocks = self.prefix // TRACE_BLOCK_TOKENS
        next_id = self.groups * prefix_blocks  # ids below this are the groups' shared blocks
        requests = []
        for i in range(self.n):
            n_blocks = -(-int(inputs[i]) // TRACE_BLOCK_TOKENS)
            shared = []
            if group_of is not None:
                g = int(group_of[i])
                shared = list(range(g * prefix_blocks, (g + 1) * prefix_blocks))[:n_blocks]
            own = list(range(next_id, next_id + n_blocks - len(shared)))
            next_id += len(own)
            requests.append(TraceRequest(float(arrivals[i]), int(inputs[i]), int(outputs[i]),
                                         tuple(shared + own)))
        return Trace(f"synthetic:{','.join(f'{k}={v}' for k, v in vars(self).items())}", "synthetic", requests)


def detect_format(path: str | Path) -> str:
    name = str(path)
    if name.startswith("synthetic"):
        return "synthetic"
    if name.endswith((".jsonl", ".json")):
        return "mooncake"
    if name.endswith(".csv"):
        return "azure"
    with open(path, encoding="utf-8") as f:
        head = f.readline().lstrip()
    return "mooncake" if head.startswith("{") else "azure"


def load_trace(path: str | Path, format: str = "auto") -> Trace:
    """Load a trace file (format from its name or first line) or a ``synthetic:...`` spec."""
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "synthetic":
        return SyntheticSpec.parse(str(path)).generate()
    if not Path(path).exists():
        raise FileNotFoundError(f"trace file not found: {path}")
    if fmt == "mooncake":
        return load_mooncake(path)
    if fmt == "azure":
        return load_azure(path)
    raise ValueError(f"unknown trace format {format!r} (mooncake, azure, synthetic)")
