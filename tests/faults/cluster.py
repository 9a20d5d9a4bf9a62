"""The fault suite's world: a real ``kvfabric up`` with two prefill and two decode instances on a
tiny model, a bounded streaming load drawn from the conversation trace with known greedy answers,
and the checks every scenario ends with.

Short timings make a scenario take seconds: the producer's hold expires after ``LEASE_S`` (set as
both ``expiry_s`` and ``lease_s``, so it holds whether the transport has a fixed expiry or a
renewable lease), a consumer gives up on a silent producer after ``RECV_TIMEOUT_S``, and the
proxy checks health every 0.3 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import yaml

from protos import kvfabric_pb2 as pb
from protos import kvfabric_pb2_grpc as pb_grpc
from tests.topology import REPO, free_port

LEASE_S = 3.0
RECV_TIMEOUT_S = 2.0
MAX_MODEL_LEN = 512
TRACE = Path(os.environ.get("KVFABRIC_FAULTS_TRACE", "/work/shared/traces/mooncake_conversation_trace_first_half.jsonl"))
RECOVERY_LIMIT_S = 60.0  # the stated bound: the proxy serves a new request this soon after any fault


@dataclass
class Job:
    prompt: list[int]
    max_tokens: int
    expected: str = ""


@dataclass
class Outcome:
    status: int = 0
    text: str = ""
    finished: bool = False
    error: str | None = None  # an OpenAI error body, an SSE error event, or the connection's failure


def trace_jobs(n: int, seed: int = 0) -> list[Job]:
    """``n`` requests shaped like the conversation trace (lengths scaled to the tiny model, shared
    prefixes kept: equal Mooncake hash ids become equal 16-token blocks)."""
    from bench.replay.traces import load_trace

    if TRACE.exists():
        reqs = load_trace(TRACE).requests[:n]
    else:  # outside this machine: random shapes of the same range
        from bench.replay.traces import TraceRequest

        rng = random.Random(seed)
        reqs = [TraceRequest(0.0, rng.randrange(1000, 12000), rng.randrange(100, 700)) for _ in range(n)]
    jobs = []
    for r in reqs:
        blocks = [random.Random(h * 7919 + seed).choices(range(3, 49000), k=16) for h in r.hash_ids] or [
            random.Random(len(jobs)).choices(range(3, 49000), k=16)]
        ids = [t for b in blocks for t in b]
        length = max(8, min(len(ids), r.input_len // 64, 200))
        jobs.append(Job(ids[:length], max(6, min(r.output_len // 16, 48))))
    return jobs


def greedy_answers(model_dir: Path, jobs: list[Job]) -> None:
    """The reference: the same model on one colocated engine, in this process."""
    from engine import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, kv_cache_bytes=64 << 20)
    outs = llm.generate([j.prompt for j in jobs],
                        [SamplingParams(temperature=0.0, max_tokens=j.max_tokens, ignore_eos=True) for j in jobs])
    for j, o in zip(jobs, outs):
        j.expected = o.outputs[0].text
    llm.llm_engine.shutdown()


class Cluster:
    """``kvfabric up`` with two prefill and two decode instances on fixed free ports."""

    def __init__(self, workdir: Path, model_dir: Path, extra: dict | None = None) -> None:
        self.workdir = workdir
        ports: list[int] = []
        while len(ports) < 5:  # free_port can hand the same just-released port out twice
            if (p := free_port()) not in ports:
                ports.append(p)
        self.ports = {"prefill": ports[0:2], "decode": ports[2:4]}
        self.proxy_port = ports[4]
        lease = {"expiry_s": LEASE_S, "lease_s": LEASE_S, "recv_timeout_s": RECV_TIMEOUT_S, "peer_idle_s": 5}
        cfg = {
            "model": str(model_dir), "dtype": "float32",
            "engine": {"max_model_len": MAX_MODEL_LEN, "kv_cache_bytes": 32 << 20, "max_num_batched_tokens": 512},
            "proxy": {"port": self.proxy_port, "health_interval_s": 0.3},
            "prefill": {"instances": 2, "ports": self.ports["prefill"]},
            "decode": {"instances": 2, "ports": self.ports["decode"]},
            "kv_transfer_config": {"kv_connector": "zmq", "kv_connector_extra_config": lease},
            **(extra or {}),
        }
        self.config_path = workdir / "faults.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = workdir / "faults.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def engines(self) -> list[tuple[str, int]]:
        return [(role, port) for role in ("prefill", "decode") for port in self.ports[role]]

    def start(self, timeout: float = 300.0) -> "Cluster":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "kvfabric.cli", "up", "--config", str(self.config_path)],
                                     cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while "kvfabric is serving at" not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kvfabric up did not start:\n{self.log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        for pid in self.all_pids():  # a SIGSTOPped child would ignore SIGTERM
            os.kill(pid, signal.SIGCONT)
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=40)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._log.close()
        leftovers = self.all_pids()
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"orphan processes after shutdown: {leftovers}"

    def pid(self, role: str, port: int) -> int | None:
        out = subprocess.run(["pgrep", "-f", f"kvfabric.cli serve {role} .*--port {port}( |$)"],
                             capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else None

    def all_pids(self) -> list[int]:
        pids = [self.pid(role, port) for role, port in self.engines()] + [self.pid("proxy", self.proxy_port)]
        return [p for p in pids if p is not None]

    def signal(self, role: str, index: int, sig: int) -> int:
        pid = self.pid(role if role != "proxy" else "proxy", self.ports[role][index] if role != "proxy" else self.proxy_port)
        os.kill(pid, sig)
        return pid

    def stats(self, role: str, port: int) -> dict:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = (pb_grpc.PrefillServiceStub if role == "prefill" else pb_grpc.DecodeServiceStub)(channel)
            reply = stub.Health(pb.HealthRequest(), timeout=5)
        return {"num_running": reply.num_running, "num_waiting": reply.num_waiting, **json.loads(reply.stats_json)}

    def all_healthy(self) -> bool:
        try:
            r = httpx.get(self.url + "/health", timeout=3)
            return r.status_code == 200 and all(i["healthy"] for i in r.json()["instances"])
        except (httpx.HTTPError, ValueError):
            return False


# ---- the load ---------------------------------------------------------------------------------------

@dataclass
class Load:
    """Every job as a concurrent streaming request; ``leave`` names the jobs whose client walks
    away after its first few tokens (an abort storm)."""

    cluster: Cluster
    jobs: list[Job]
    leave: set[int] = field(default_factory=set)
    outcomes: list[Outcome] = field(default_factory=list)
    first_tokens: int = 0  # how many streams have seen a token (a scenario waits on it)

    async def run(self, fault) -> list[Outcome]:
        """Run every job with ``fault(cluster, load)`` beside them; a job the fault cancels left."""
        self.outcomes = [Outcome() for _ in self.jobs]
        async with httpx.AsyncClient(base_url=self.cluster.url, timeout=httpx.Timeout(120, connect=10)) as c:
            tasks = [asyncio.create_task(self._one(c, i), name=f"job-{i}") for i in range(len(self.jobs))]
            injected = asyncio.create_task(fault(self.cluster, self))
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await injected
        for out, r in zip(self.outcomes, results):
            if isinstance(r, BaseException):
                out.error = out.error or "client left"
        return self.outcomes

    async def _one(self, c: httpx.AsyncClient, i: int) -> None:
        job, out = self.jobs[i], self.outcomes[i]
        body = {"prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}
        seen = 0
        try:
            async with c.stream("POST", "/v1/completions", json=body) as r:
                out.status = r.status_code
                if r.status_code != 200:
                    out.error = (await r.aread()).decode()[:300]
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        out.error = event["error"]["message"]
                        continue
                    choice = event["choices"][0]
                    out.text += choice["text"]
                    seen += 1
                    if seen == 1:
                        self.first_tokens += 1
                    if choice.get("finish_reason"):
                        out.finished = True
                    if i in self.leave and seen >= 3:
                        out.error = "client left"
                        return
        except (httpx.HTTPError, ValueError) as e:
            out.error = out.error or f"{type(e).__name__}: {e}"


# ---- the invariants ---------------------------------------------------------------------------------

def check_answers(jobs: list[Job], outcomes: list[Outcome]) -> dict:
    """Every request completed with exactly its greedy text, or got an error: never a 200 with other
    tokens. Returns the counts for the report."""
    wrong = [(i, o.text, j.expected) for i, (j, o) in enumerate(zip(jobs, outcomes))
             if o.error is None and (not o.finished or o.text != j.expected)]
    assert not wrong, f"silent wrong answers (index, got, expected): {wrong[:3]}"
    return {"requests": len(jobs), "completed": sum(o.error is None for o in outcomes),
            "errors": sum(o.error is not None for o in outcomes)}


def probe(cluster: Cluster, job: Job, timeout: float = RECOVERY_LIMIT_S) -> float:
    """Seconds until the proxy answers ``job`` correctly again (the recovery time)."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < timeout:
        try:
            r = httpx.post(cluster.url + "/v1/completions", timeout=30, json={
                "prompt": job.prompt, "max_tokens": job.max_tokens, "temperature": 0, "ignore_eos": True})
            if r.status_code == 200:
                assert r.json()["choices"][0]["text"] == job.expected, "a wrong answer after recovery"
                return time.monotonic() - started
            last = r.text
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.25)
    raise AssertionError(f"the proxy did not serve again within {timeout} s: {last}")


def shm_entries() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()} if Path("/dev/shm").exists() else set()


def check_no_shm_left(before: set[str], pids) -> None:
    """No /dev/shm segment of these processes outlives the fault. Segments are named
    kvfabric-<pid>-<n>; other tests on this machine may have their own."""
    ours = {str(p) for p in pids if p}
    leftover = {s for s in shm_entries() - before if s.split("-")[1:2] and s.split("-")[1] in ours}
    assert not leftover, f"shared-memory segments left behind: {leftover}"


def wait_engines_clean(cluster: Cluster, baseline: dict, timeout: float = LEASE_S + 20) -> dict:
    """Every engine is back to its starting free-block count with nothing running or held.

    Allowed time: one lease (the longest a producer may rightly hold blocks for a decode that
    never came) plus the slack a restarted engine needs to load on two shared cores.
    """
    deadline = time.monotonic() + timeout
    last: dict = {}
    while True:
        leaked = {}
        for role, port in cluster.engines():
            try:
                s = cluster.stats(role, port)
            except grpc.RpcError as e:
                leaked[f"{role}:{port}"] = f"unreachable: {e.code()}"
                continue
            last[f"{role}:{port}"] = s
            bad = {k: s.get(k) for k in ("num_running", "num_waiting", "num_held_for_transfer",
                                         "connector_held_blocks", "connector_loads_in_flight") if s.get(k)}
            if s["num_free_blocks"] != baseline.get(port, s["num_blocks"] - 1):
                bad["free_blocks"] = (s["num_free_blocks"], baseline.get(port))
            if bad:
                leaked[f"{role}:{port}"] = bad
        if not leaked:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"engines not clean {timeout} s after the fault: {leaked}")
        time.sleep(0.25)
