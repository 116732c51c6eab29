"""Scheduler driven by hand-made runner outputs: no model, no tensors."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenrelay_engines.base import FinishReason, Request, StoppingCriteria
from tokenrelay_engines.config import SchedulerConfig
from tokenrelay_engines.scheduler.block_manager import BlockManager
from tokenrelay_engines.scheduler.scheduler import Scheduler
from tokenrelay_engines.scheduler.sequence import RunnerOutput, SchedulerOutput, Sequence, SequenceStatus

EOS = 2
FILLER = 50  # a token that never stops anything


def make_seq(rid: str, prompt_len: int = 4, max_tokens: int = 4, priority: int = 0,
             arrival: float = 0.0, deadline: float | None = None, **stopping) -> Sequence:
    req = Request(rid, [10 + i % 30 for i in range(prompt_len)],
                  stopping=StoppingCriteria(max_tokens=max_tokens, **stopping),
                  priority=priority, arrival_time=arrival, deadline=deadline)
    return Sequence(req, seed=0)


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_num_seqs: int = 8,
                   budget: int = 32, max_model_len: int = 1024,
                   clock: Callable[[], float] | None = None, prefix_caching: bool = False) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             block_size=block_size, enable_prefix_caching=prefix_caching)
    kwargs = {"clock": clock} if clock is not None else {}
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    return Scheduler(config, bm, (EOS,), max_model_len, **kwargs)


def check_step(sched: Scheduler, out: SchedulerOutput) -> None:
    """Invariants of every batch."""
    cfg = sched.config
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(out.chunks) <= cfg.max_num_seqs
    assert len(sched.running) <= cfg.max_num_seqs
    ids = [id(c.seq) for c in out.chunks]
    assert len(ids) == len(set(ids)), "a sequence appears twice in one batch"
    for c in out.chunks:
        assert c.seq.status is SequenceStatus.RUNNING and not c.seq.is_finished
        assert c.num_new_tokens >= 1
        assert c.start == c.seq.num_computed_tokens
        assert c.end <= c.seq.num_tokens
        assert len(c.seq.block_table) * sched.block_manager.block_size >= c.end
    bm = sched.block_manager
    holders = [0] * bm.num_blocks
    for s in sched.running:
        assert len(set(s.block_table)) == len(s.block_table)
        for b in s.block_table:
            holders[b] += 1
    assert holders == bm.ref_counts, "a block's reference count is the number of its holders"
    assert all(b not in bm.free_block_ids for b, n in enumerate(holders) if n)
    assert all(not s.block_table for s in sched.waiting)


def runner_output(out: SchedulerOutput, token: Callable[[Sequence], int] = lambda s: FILLER) -> RunnerOutput:
    return RunnerOutput({c.seq.request_id: token(c.seq) for c in out.chunks if c.sample})


def step(sched: Scheduler, token: Callable[[Sequence], int] = lambda s: FILLER) -> tuple[SchedulerOutput, list[Sequence]]:
    out = sched.schedule()
    check_step(sched, out)
    return out, sched.update(out, runner_output(out, token))


def drain(sched: Scheduler, max_steps: int = 10_000, token=lambda s: FILLER) -> list[str]:
    """Step until done; return request ids in finishing order."""
    order: list[str] = []
    for _ in range(max_steps):
        if not sched.has_unfinished:
            return order
        out, touched = step(sched, token)
        order += [s.request_id for s in touched + out.finished if s.is_finished]
    raise AssertionError("scheduler did not finish")


def test_token_budget_and_decode_first() -> None:
    sched = make_scheduler(budget=10, max_num_seqs=4)
    seqs = [make_seq(f"r{i}", prompt_len=9, max_tokens=5) for i in range(4)]
    for s in seqs:
        sched.add(s)
    out, _ = step(sched)
    assert [(c.seq.request_id, c.num_new_tokens) for c in out.chunks] == [("r0", 9), ("r1", 1)]
    out, _ = step(sched)
    # r0 decodes first (1 token), then r1 continues its prefill with what is left
    assert [(c.seq.request_id, c.num_new_tokens) for c in out.chunks] == [("r0", 1), ("r1", 8), ("r2", 1)]
    drain(sched)
    assert all(s.finish_reason is FinishReason.LENGTH and s.num_output_tokens == 5 for s in seqs)
    assert sched.block_manager.num_used_blocks == 0


def test_chunked_prefill_covers_every_prompt_token_once() -> None:
    sched = make_scheduler(budget=7, max_num_seqs=3)
    seqs = [make_seq(f"r{i}", prompt_len=n, max_tokens=3) for i, n in enumerate((20, 5, 13, 1))]
    computed: dict[str, list[int]] = {s.request_id: [] for s in seqs}
    for s in seqs:
        sched.add(s)
    while sched.has_unfinished:
        out, _ = step(sched)
        for c in out.chunks:
            computed[c.seq.request_id] += list(range(c.start, c.end))
    for s in seqs:
        # prompt positions once, then one position per decode step (not the last sampled token)
        assert computed[s.request_id] == list(range(s.num_tokens - 1))
        assert s.num_output_tokens == 3


def test_priority_then_arrival_order() -> None:
    sched = make_scheduler(max_num_seqs=1)
    specs = [("late-hi", -5, 3.0), ("early-lo", 5, 0.0), ("mid", 0, 1.0), ("early-mid", 0, 0.5), ("job", 1000, 0.1)]
    for rid, prio, arrival in specs:
        sched.add(make_seq(rid, priority=prio, arrival=arrival, max_tokens=2))
    assert drain(sched) == ["late-hi", "early-mid", "mid", "early-lo", "job"]


def test_same_key_keeps_add_order() -> None:
    sched = make_scheduler(max_num_seqs=1)
    for i in range(4):
        sched.add(make_seq(f"r{i}", max_tokens=1))
    assert drain(sched) == ["r0", "r1", "r2", "r3"]


def test_preemption_picks_lowest_priority_then_youngest_and_it_completes() -> None:
    # 6 blocks of 4 tokens; three sequences of 8 prompt tokens each need 3 blocks to decode.
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64)
    a = make_seq("a", prompt_len=8, max_tokens=6, priority=0, arrival=0.0)
    b = make_seq("b", prompt_len=8, max_tokens=6, priority=1, arrival=0.0)
    c = make_seq("c", prompt_len=8, max_tokens=6, priority=1, arrival=1.0)  # youngest, lowest
    for s in (a, b, c):
        sched.add(s)
    out, _ = step(sched)
    assert {ch.seq.request_id for ch in out.chunks} == {"a", "b", "c"}
    out, _ = step(sched)  # each now holds 9 tokens: needs a third block
    assert [p.request_id for p in out.preempted] == ["c"]
    assert out.finished_req_ids == ["c"]  # the runner drops c's row before this step
    assert c.status is SequenceStatus.WAITING and c.num_computed_tokens == 0 and c.block_table == []
    kept = list(c.output_token_ids)
    assert kept == [FILLER]  # output tokens survive preemption
    drain(sched, token=lambda s: FILLER + s.num_output_tokens)
    for s in (a, b, c):
        assert s.finish_reason is FinishReason.LENGTH and s.num_output_tokens == 6
    assert c.output_token_ids[0] == FILLER and c.num_preemptions >= 1
    assert sched.num_preemptions >= 1
    assert sched.block_manager.num_used_blocks == 0


def test_preempted_sequence_is_recomputed_as_prompt_plus_output() -> None:
    sched = make_scheduler(num_blocks=3, block_size=4, budget=64)
    a = make_seq("a", prompt_len=4, max_tokens=6, priority=0)
    b = make_seq("b", prompt_len=4, max_tokens=6, priority=5)
    sched.add(a)
    sched.add(b)
    step(sched)  # both prefilled, one token each
    step(sched)  # 6 tokens each: 2 blocks each -> b preempted
    assert b.status is SequenceStatus.WAITING
    while b.status is SequenceStatus.WAITING:
        out, _ = step(sched)
    # b's first chunk after preemption recomputes prompt and output together
    first = next(ch for ch in out.chunks if ch.seq is b)
    assert first.start == 0 and first.num_new_tokens == b.num_tokens - 1 or first.sample
    drain(sched)
    assert b.finish_reason is FinishReason.LENGTH and b.num_output_tokens == 6


def test_interactive_request_preempts_jobs() -> None:
    sched = make_scheduler(num_blocks=64, max_num_seqs=2, budget=64)
    jobs = [make_seq(f"job{i}", max_tokens=50, priority=1000 + i) for i in range(2)]
    for j in jobs:
        sched.add(j)
    step(sched)
    assert len(sched.running) == 2
    chat = make_seq("chat", max_tokens=3, priority=0, arrival=5.0)
    sched.add(chat)
    out, _ = step(sched)
    assert [p.request_id for p in out.preempted] == ["job1"]  # the worse job goes
    assert chat.status is SequenceStatus.RUNNING
    order = drain(sched)
    assert order[0] == "chat"
    assert all(j.finish_reason is FinishReason.LENGTH and j.num_output_tokens == 50 for j in jobs)


def test_interactive_request_takes_blocks_back_from_job() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, max_num_seqs=4, budget=64)
    job = make_seq("job", prompt_len=12, max_tokens=4, priority=1000)
    sched.add(job)
    step(sched)
    chat = make_seq("chat", prompt_len=8, max_tokens=2, priority=0)
    sched.add(chat)
    out, _ = step(sched)
    assert [p.request_id for p in out.preempted] == ["job"]
    assert [c.seq.request_id for c in out.chunks] == ["chat"]
    assert drain(sched)[0] == "chat"
    assert job.finish_reason is FinishReason.LENGTH


def test_equal_priority_waiting_does_not_preempt() -> None:
    sched = make_scheduler(max_num_seqs=1)
    a = make_seq("a", max_tokens=5, priority=3)
    sched.add(a)
    step(sched)
    sched.add(make_seq("b", max_tokens=5, priority=3, arrival=-1.0))  # older, same priority
    out, _ = step(sched)
    assert not out.preempted and [c.seq.request_id for c in out.chunks] == ["a"]


def test_abort_at_every_stage() -> None:
    sched = make_scheduler(budget=4, max_num_seqs=8)
    waiting = make_seq("waiting", prompt_len=4)
    partial = make_seq("partial", prompt_len=10)
    decoding = make_seq("decoding", prompt_len=2, max_tokens=10)
    inflight = make_seq("inflight", prompt_len=2, max_tokens=10)
    sched.add(decoding)
    sched.add(inflight)
    step(sched)  # both prefilled
    sched.add(partial)
    sched.add(waiting)
    step(sched)  # decodes + part of "partial"
    assert 0 < partial.num_computed_tokens < partial.num_tokens - 1
    assert waiting.status is SequenceStatus.WAITING
    for seq in (waiting, partial, decoding):
        assert sched.abort(seq.request_id) is seq
        assert seq.finish_reason is FinishReason.CANCELLED and seq.block_table == []
        assert sched.abort(seq.request_id) is None  # idempotent
    out = sched.schedule()
    assert [c.seq.request_id for c in out.chunks] == ["inflight"]
    before = inflight.num_output_tokens
    sched.abort("inflight")  # between schedule() and update()
    touched = sched.update(out, runner_output(out))
    assert touched == [] and inflight.num_output_tokens == before
    assert sched.abort("never-seen") is None
    assert not sched.has_unfinished and sched.block_manager.num_used_blocks == 0
    assert sched.schedule().is_empty


def test_abort_after_finish_is_noop() -> None:
    sched = make_scheduler()
    seq = make_seq("a", max_tokens=1)
    sched.add(seq)
    drain(sched)
    assert sched.abort("a") is None and seq.finish_reason is FinishReason.LENGTH


def _run_one(seq: Sequence, tokens: list[int], **kw) -> Sequence:
    sched = make_scheduler(**kw)
    sched.add(seq)
    it = iter(tokens)
    drain(sched, token=lambda s: next(it))
    assert sched.block_manager.num_used_blocks == 0
    return seq


def test_eos_stops_and_respects_min_tokens_and_ignore_eos() -> None:
    s = _run_one(make_seq("a", max_tokens=10), [5, EOS, 5, 5])
    assert s.finish_reason is FinishReason.EOS and s.output_token_ids == [5, EOS] and s.stop_reason is None
    s = _run_one(make_seq("b", max_tokens=10, min_tokens=2), [EOS, EOS, EOS, 5])
    assert s.finish_reason is FinishReason.EOS and s.output_token_ids == [EOS, EOS, EOS]
    s = _run_one(make_seq("c", max_tokens=3, ignore_eos=True), [EOS, EOS, EOS])
    assert s.finish_reason is FinishReason.LENGTH and s.num_output_tokens == 3


def test_max_tokens_and_stop_token_ids() -> None:
    s = _run_one(make_seq("a", max_tokens=3), [5, 6, 7])
    assert s.finish_reason is FinishReason.LENGTH and s.output_token_ids == [5, 6, 7]
    s = _run_one(make_seq("b", max_tokens=9, stop_token_ids=(7,)), [5, 7, 9])
    assert s.finish_reason is FinishReason.STOP and s.stop_reason == 7 and s.output_token_ids == [5, 7]
    s = _run_one(make_seq("c", max_tokens=9, min_tokens=1, stop_token_ids=(7,)), [7, 7])
    assert s.finish_reason is FinishReason.STOP and s.output_token_ids == [7, 7]


def test_context_full_and_overlong_prompt_finish_with_length() -> None:
    s = _run_one(make_seq("a", prompt_len=6, max_tokens=10), [5] * 10, max_model_len=8)
    assert s.finish_reason is FinishReason.LENGTH and s.num_tokens == 8
    sched = make_scheduler(max_model_len=8)
    long = make_seq("long", prompt_len=9)
    sched.add(long)
    assert long.finish_reason is FinishReason.LENGTH and not sched.has_unfinished


def test_sequence_larger_than_the_pool_finishes_with_length() -> None:
    sched = make_scheduler(num_blocks=2, block_size=4, budget=64)
    seq = make_seq("big", prompt_len=6, max_tokens=10)
    sched.add(seq)
    drain(sched)
    # 8 tokens fill the pool; the token sampled from the last of them is kept
    assert seq.finish_reason is FinishReason.LENGTH and seq.num_tokens == 9
    assert sched.block_manager.num_used_blocks == 0


def test_deadlines() -> None:
    now = [100.0]
    sched = make_scheduler(clock=lambda: now[0], max_num_seqs=1)
    running = make_seq("running", max_tokens=50, deadline=105.0)
    queued = make_seq("queued", max_tokens=50, deadline=102.0)
    sched.add(running)
    sched.add(queued)
    step(sched)
    assert sched.next_deadline() == 102.0
    now[0] = 103.0
    assert sched.finish_expired() == [queued]
    assert queued.finish_reason is FinishReason.DEADLINE
    step(sched)
    now[0] = 106.0
    _, touched = step(sched)  # update() checks the deadline of what it touched
    assert touched == [running] and running.finish_reason is FinishReason.DEADLINE
    assert sched.block_manager.num_used_blocks == 0 and not sched.has_unfinished


# ---- property: random adds, steps, aborts with a tiny pool ------------------------------

_op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 14), st.integers(1, 8), st.sampled_from([-1, 0, 1, 1000])),
    st.tuples(st.just("add"), st.integers(4, 10), st.integers(4, 12), st.sampled_from([0, 1000])),
    st.tuples(st.just("step"), st.integers(0, 3), st.just(0), st.just(0)),
    st.tuples(st.just("abort"), st.integers(0, 30), st.just(0), st.just(0)),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=4, max_size=60), num_blocks=st.integers(2, 8), block_size=st.integers(1, 3),
       budget=st.integers(1, 16), max_num_seqs=st.integers(1, 4), prefix_caching=st.booleans())
def test_random_workload_never_leaks_or_overruns(ops, num_blocks, block_size, budget, max_num_seqs,
                                                 prefix_caching) -> None:
    # every prompt starts with the same tokens, so prefix caching shares blocks heavily
    sched = make_scheduler(num_blocks=num_blocks, block_size=block_size, budget=budget,
                           max_num_seqs=max_num_seqs, max_model_len=24, prefix_caching=prefix_caching)
    seqs: list[Sequence] = []
    finished_ids: set[int] = set()
    rows: dict[str, tuple[int, int]] = {}  # the runner's persistent rows: request id -> incarnation
    last: list[list[tuple[Sequence, int]]] = [[]]  # the last non-empty step's (sequence, end) per chunk

    def one_step(eos_every: int) -> None:
        out = sched.schedule()
        check_step(sched, out)
        if out.decode_continues:  # the runner trusts it: the last step's sequences, each one token further
            assert [(c.seq, c.start, c.num_new_tokens) for c in out.chunks] == [(s, e, 1) for s, e in last[0]]
            assert out.chunks and [c.seq for c in out.chunks] == sched.running
        if out.chunks:
            last[0] = [(c.seq, c.end) for c in out.chunks]
        for rid in out.finished_req_ids:
            rows.pop(rid, None)
        for c in out.chunks:  # a row is reused only by the same sequence, never across a preemption
            incarnation = (id(c.seq), c.seq.num_preemptions)
            assert rows.setdefault(c.seq.request_id, incarnation) == incarnation
        assert not any(id(c.seq) in finished_ids for c in out.chunks)
        tok = (lambda s: EOS if eos_every and s.num_output_tokens % (eos_every + 1) == eos_every else FILLER)
        for s in sched.update(out, runner_output(out, tok)) + out.finished:
            if s.is_finished:
                finished_ids.add(id(s))
        used = len({b for s in sched.running for b in s.block_table})
        assert sched.block_manager.num_used_blocks == used

    for kind, a, b, prio in ops:
        if kind == "add":
            seq = make_seq(f"r{len(seqs)}", prompt_len=a, max_tokens=b, priority=prio, arrival=len(seqs))
            seqs.append(seq)
            sched.add(seq)
        elif kind == "step":
            one_step(a)
        elif seqs:
            victim = seqs[a % len(seqs)]
            sched.abort(victim.request_id)
            if victim.is_finished:
                finished_ids.add(id(victim))
    for _ in range(2000):
        if not sched.has_unfinished:
            break
        one_step(0)
    assert not sched.has_unfinished
    assert all(s.is_finished for s in seqs)
    assert sched.block_manager.num_used_blocks == 0
    assert sorted(sched.block_manager.free_block_ids) == list(range(num_blocks))
    for s in seqs:
        if s.finish_reason is FinishReason.LENGTH:
            assert s.num_output_tokens == s.request.stopping.max_tokens or s.num_tokens >= 24 \
                or s.num_tokens > num_blocks * block_size - block_size


def test_decode_continues_only_between_unchanged_decode_steps() -> None:
    """The runner builds a step from its rows alone when `decode_continues` is set: only for a
    decode step over exactly the last step's sequences, with nothing joined, left or preempted."""
    sched = make_scheduler(budget=64)
    a, b, c = make_seq("a", max_tokens=20), make_seq("b", max_tokens=20), make_seq("c", max_tokens=20)
    sched.add(a)
    sched.add(b)
    flags = [step(sched)[0].decode_continues for _ in range(4)]  # prefill, decode, decode, decode
    assert flags == [False, False, True, True]
    sched.add(c)
    flags = [step(sched)[0].decode_continues for _ in range(3)]  # c's prefill beside a, b's decode
    assert flags == [False, False, True]
    sched.abort("b")
    flags = [step(sched)[0].decode_continues for _ in range(2)]  # b left: its row must go first
    assert flags == [False, True]
    out = sched.schedule()
    assert out.decode_continues and [ch.seq for ch in out.chunks] == [a, c]
    sched.update(out, RunnerOutput({}.fromkeys(("a", "c"), FILLER)))
    sched.finish_expired()  # (no deadlines) nothing leaves: the next step still continues
    assert sched.schedule().decode_continues


# ---- prefix caching ---------------------------------------------------------------------

def test_prefix_cache_shares_computed_prompt_blocks() -> None:
    sched = make_scheduler(num_blocks=16, block_size=4, budget=64, prefix_caching=True)
    first = make_seq("first", prompt_len=10, max_tokens=2)
    sched.add(first)
    drain(sched)
    assert first.num_cached_tokens == 0
    second = make_seq("second", prompt_len=10, max_tokens=2)  # same prompt
    sched.add(second)
    out, _ = step(sched)
    assert second.num_cached_tokens == 8  # two full blocks; the rest is computed
    assert [(c.start, c.num_new_tokens) for c in out.chunks] == [(8, 2)]
    drain(sched)
    exact = make_seq("exact", prompt_len=8, max_tokens=2)  # prompt = two whole cached blocks
    sched.add(exact)
    out, _ = step(sched)
    assert exact.num_cached_tokens == 4  # the last token is always computed: one block recomputed
    assert [(c.start, c.num_new_tokens) for c in out.chunks] == [(4, 4)]
    drain(sched)
    assert sched.block_manager.num_used_blocks == 0


def test_prefix_cache_shares_blocks_between_running_sequences() -> None:
    sched = make_scheduler(num_blocks=16, block_size=4, budget=64, prefix_caching=True)
    a = make_seq("a", prompt_len=12, max_tokens=5)
    sched.add(a)
    step(sched)
    b = make_seq("b", prompt_len=13, max_tokens=5)
    sched.add(b)
    step(sched)
    assert b.num_cached_tokens == 12 and b.block_table[:3] == a.block_table[:3]
    assert all(sched.block_manager.ref_counts[blk] == 2 for blk in a.block_table[:3])
    sched.abort("a")
    assert all(sched.block_manager.ref_counts[blk] == 1 for blk in b.block_table[:3])
    drain(sched)
    assert sched.block_manager.num_used_blocks == 0


def test_cached_blocks_are_evicted_when_the_pool_needs_them() -> None:
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64, prefix_caching=True)
    a = make_seq("a", prompt_len=8, max_tokens=1)
    sched.add(a)
    drain(sched)
    assert sched.block_manager.num_cached_blocks == 2 and sched.block_manager.num_free_blocks == 4
    other = Sequence(Request("other", [99] * 15, stopping=StoppingCriteria(max_tokens=1)), seed=0)
    sched.add(other)
    drain(sched)
    assert other.num_cached_tokens == 0
    again = make_seq("again", prompt_len=8, max_tokens=1)
    sched.add(again)
    drain(sched)
    assert again.num_cached_tokens == 0  # its blocks were reused by "other"
    assert sched.block_manager.num_used_blocks == 0
