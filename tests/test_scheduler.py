"""The scheduler without a model: budgets, chunking, preemption, remote-KV waits, holds, leaks.

Fake "runner" outputs stand in for the model; every scenario ends with the pool clean.
"""

from __future__ import annotations

from engine.block_hash import model_hash_seed
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig

BS = 4


def make_scheduler(num_blocks=64, budget=16, max_seqs=8, max_model_len=256, connector=None):
    kv = KVCacheManager(num_blocks, BS, True, model_hash_seed("test", "float32", BS, "test"))
    return Scheduler(SchedulerConfig(budget, max_seqs, max_model_len, BS), kv, connector)


def make_request(rid, prompt_len, max_tokens=4, prefix=(), **kw):
    prompt = list(prefix) + [1000 + hash((rid, i)) % 1000 for i in range(prompt_len - len(prefix))]
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), max_tokens=max_tokens, **kw)


def run_step(sched, token=7):
    out = sched.schedule()
    sampled = {s.request.request_id: token for s in out.scheduled if s.samples}
    sched.update_from_output(out, sampled)
    return out


def assert_clean(sched):
    kv = sched.kv
    assert sched.num_unfinished == 0 and not sched.held
    assert kv.num_free_blocks == kv.stats()["num_blocks"] - 1
    assert all(b.ref_cnt == 0 for b in kv.block_pool.blocks)


def drain(sched, limit=500):
    for _ in range(limit):
        if not sched.num_unfinished and not sched.held:
            return
        run_step(sched)
    raise AssertionError("scheduler did not drain")


def test_chunked_prefill_respects_the_token_budget():
    sched = make_scheduler(budget=16)
    sched.add_request(make_request("a", 40))
    sizes = [run_step(sched).num_scheduled_tokens["a"] for _ in range(3)]
    assert sizes == [16, 16, 8]  # the last chunk reaches the prompt's end and samples
    drain(sched)
    assert_clean(sched)


def test_decodes_and_prefill_chunks_share_a_step_decodes_first():
    sched = make_scheduler(budget=10)
    sched.add_request(make_request("a", 6))
    run_step(sched)
    sched.add_request(make_request("b", 30))
    out = run_step(sched)
    assert [s.request.request_id for s in out.scheduled] == ["a", "b"]
    assert out.num_scheduled_tokens == {"a": 1, "b": 9}
    drain(sched)
    assert_clean(sched)


def test_max_num_seqs_caps_the_batch():
    sched = make_scheduler(max_seqs=2)
    for i in range(4):
        sched.add_request(make_request(f"r{i}", 3))
    out = run_step(sched)
    assert set(out.num_scheduled_tokens) == {"r0", "r1"}
    drain(sched)
    assert_clean(sched)


def test_preemption_when_blocks_run_out_recomputes_later():
    sched = make_scheduler(num_blocks=7, budget=64)  # 6 usable blocks = 24 tokens
    sched.add_request(make_request("a", 10, max_tokens=8))
    sched.add_request(make_request("b", 10, max_tokens=8))
    outs = [run_step(sched) for _ in range(6)]
    assert any(o.preempted_ids == ["b"] for o in outs)
    drain(sched)
    assert sched.num_preemptions >= 1
    assert_clean(sched)


def test_shared_prefix_hits_the_cache():
    sched = make_scheduler()
    prefix = list(range(1, 13))  # three full blocks
    sched.add_request(make_request("a", 14, prefix=prefix))
    drain(sched)
    b = make_request("b", 14, prefix=prefix)
    sched.add_request(b)
    out = run_step(sched)
    assert b.num_cached_tokens == 12 and out.num_scheduled_tokens == {"b": 2}
    drain(sched)
    assert_clean(sched)


def test_abort_of_waiting_and_running_requests_frees_everything():
    sched = make_scheduler()
    sched.add_request(make_request("a", 8, max_tokens=50))
    sched.add_request(make_request("b", 8, max_tokens=50))
    run_step(sched)
    sched.add_request(make_request("c", 8))
    sched.finish_requests(["a", "c"], RequestStatus.FINISHED_ABORTED)
    assert {r.request_id for r in sched.take_finished()} == {"a", "c"}
    drain(sched)
    assert_clean(sched)


class RecordingConnector:
    """A stand-in for a transport: loads finish when the test says so."""

    def __init__(self, remote_tokens=0, hold=False, policy="recompute", held_budget=None):
        self.remote_tokens, self.hold = remote_tokens, hold
        self.kv_load_failure_policy, self.budget = policy, held_budget
        self.allocated, self.aborted, self.added = {}, [], []
        self.sent, self.received, self.failed = set(), set(), {}

    def request_added(self, request):
        self.added.append(request.request_id)

    def held_block_budget(self, num_blocks):
        return self.budget

    def get_num_new_matched_tokens(self, request, num_computed):
        if request.kv_transfer_params is None:
            return 0, False
        return self.remote_tokens - num_computed, True

    def update_state_after_alloc(self, request, block_ids, num_external):
        self.allocated[request.request_id] = (list(block_ids), num_external)

    def build_connector_meta(self, scheduled):
        return scheduled

    def request_finished(self, request, block_ids):
        return self.hold, ({"held": block_ids} if self.hold else None)

    def get_finished(self):
        out = (self.sent, self.received, self.failed)
        self.sent, self.received, self.failed = set(), set(), {}
        return out

    def abort(self, request_id):
        self.aborted.append(request_id)


def test_remote_kv_request_waits_outside_the_batch_then_decodes():
    conn = RecordingConnector(remote_tokens=10)
    sched = make_scheduler(connector=conn)
    req = make_request("d", 10, max_tokens=3, kv_transfer_params={"remote": 1})
    req.output_token_ids.append(5)  # the first token came from prefill
    sched.add_request(req)
    out = run_step(sched)
    assert out.scheduled == [] and req.status == RequestStatus.WAITING_FOR_REMOTE_KV
    assert conn.allocated["d"][1] == 10 and len(conn.allocated["d"][0]) == 3
    conn.received.add("d")
    out = run_step(sched)
    assert out.num_scheduled_tokens == {"d": 1}  # only the first token's KV is computed here
    drain(sched)
    assert req.output_token_ids == [5, 7, 7]
    assert_clean(sched)


def test_failed_load_under_policy_fail_finishes_the_request_with_an_error():
    conn = RecordingConnector(remote_tokens=10, policy="fail")
    sched = make_scheduler(connector=conn)
    sched.add_request(make_request("d", 10, kv_transfer_params={"remote": 1}))
    run_step(sched)
    conn.failed["d"] = "peer vanished"
    run_step(sched)
    [done] = sched.take_finished()
    assert done.status == RequestStatus.FINISHED_ABORTED and "peer vanished" in sched.errors["d"]
    assert_clean(sched)


def test_failed_load_is_recomputed_with_the_first_token_not_sampled_again():
    conn = RecordingConnector(remote_tokens=10)
    sched = make_scheduler(connector=conn)
    req = make_request("d", 10, max_tokens=3, kv_transfer_params={"remote": 1})
    req.output_token_ids.append(5)  # streamed by prefill already
    sched.add_request(req)
    assert conn.added == ["d"]  # the connector knows it before it is ever scheduled
    run_step(sched)
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KV
    conn.failed["d"] = "lease ran out"
    out = run_step(sched)
    # Prompt and first token computed here in one go; the step samples the second token.
    assert out.num_scheduled_tokens == {"d": 11}
    assert req.kv_transfer_params is None and "d" not in sched.errors
    drain(sched)
    assert req.output_token_ids == [5, 7, 7] and req.status == RequestStatus.FINISHED_LENGTH
    assert sched.stats()["kv_load_failures_recomputed"] == 1
    assert_clean(sched)


def test_held_blocks_over_budget_stop_admission_without_failing_anything():
    conn = RecordingConnector(hold=True, held_budget=3)
    sched = make_scheduler(connector=conn)
    for rid in "abc":
        sched.add_request(make_request(rid, 9, max_tokens=1))  # 3 blocks each
    run_step(sched)  # a (9 tokens) and b's first 7: the step's budget
    while len(sched.held) < 2:
        run_step(sched)
    assert set(sched.held) == {"a", "b"}  # a alone (3 blocks) reached the budget: c waits
    for _ in range(5):
        assert run_step(sched).scheduled == []
    assert [r.request_id for r in sched.waiting] == ["c"] and not sched.errors
    assert sched.stats()["num_backpressure_steps"] >= 5
    conn.sent |= {"a", "b"}  # decode read them: admission resumes
    run_step(sched)
    assert "c" in sched.held or sched.running
    conn.sent.add("c")
    drain(sched)
    conn.sent.add("c")
    run_step(sched)
    assert_clean(sched)


def test_abort_while_waiting_for_remote_kv_tells_the_connector_at_once():
    conn = RecordingConnector(remote_tokens=10)
    sched = make_scheduler(connector=conn)
    sched.add_request(make_request("d", 10, kv_transfer_params={"remote": 1}))
    run_step(sched)
    sched.finish_requests(["d"], RequestStatus.FINISHED_ABORTED)
    assert conn.aborted == ["d"]
    assert_clean(sched)


def test_producer_holds_blocks_until_the_send_completes():
    conn = RecordingConnector(hold=True)
    sched = make_scheduler(connector=conn)
    req = make_request("p", 9, max_tokens=1)
    sched.add_request(req)
    run_step(sched)
    assert "p" in sched.held and req.kv_transfer_params == {"held": [1, 2, 3]}
    assert sched.kv.num_free_blocks < 63
    conn.sent.add("p")
    run_step(sched)
    assert_clean(sched)
