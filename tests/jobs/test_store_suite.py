"""One suite, both stores: SQLite (embedded) and a real Redis server."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tokenrelay_server.jobs.model import (
    Delta, IdempotencyConflict, JobError, JobNotFound, JobState, JobTier, WebhookDelivery, merge_deltas,
)
from tokenrelay_server.jobs.store import JobStore

from tests.jobs.conftest import StoreFactory
from tests.jobs.helpers import make_job

NOW = 1000.0


async def test_create_get_roundtrip(store: JobStore) -> None:
    job = make_job()
    stored, created = await store.create(job)
    assert created and stored.job_id == job.job_id
    got = await store.get(job.job_id)
    assert got.to_dict() == job.to_dict()
    assert got.state is JobState.QUEUED and got.params == b"\x01\x02" and got.labels == {"team": "a"}
    with pytest.raises(JobNotFound):
        await store.get("job_missing")


async def test_committed_job_survives_reopen(stores: StoreFactory) -> None:
    first = await stores.open()
    job = make_job()
    await first.create(job)
    await first.close()
    stores.opened.remove(first)
    second = await stores.open()
    assert (await second.get(job.job_id)).job_id == job.job_id


async def test_idempotency_same_request_same_job_other_request_refused(store: JobStore) -> None:
    a = make_job(key="k1", fingerprint="f1")
    _, created = await store.create(a)
    assert created
    again, created = await store.create(make_job(key="k1", fingerprint="f1"))
    assert not created and again.job_id == a.job_id
    with pytest.raises(IdempotencyConflict) as err:
        await store.create(make_job(key="k1", fingerprint="other"))
    assert err.value.job_id == a.job_id
    page, _ = await store.list(frozenset(), 100, "")
    assert [j.job_id for j in page] == [a.job_id]


async def test_claim_order_urgent_standard_bulk_then_fifo(store: JobStore) -> None:
    bulk = make_job(tier=JobTier.BULK, now=NOW)
    std1 = make_job(tier=JobTier.STANDARD, now=NOW + 1)
    urgent = make_job(tier=JobTier.URGENT, now=NOW + 2)
    std2 = make_job(tier=JobTier.STANDARD, now=NOW + 3)
    for j in (bulk, std1, urgent, std2):
        await store.create(j)
    order = []
    for _ in range(4):
        job = await store.claim("r1", 30.0, NOW + 10)
        assert job is not None and job.state is JobState.RUNNING and job.attempts == 1 and job.owner == "r1"
        order.append(job.job_id)
    assert order == [urgent.job_id, std1.job_id, std2.job_id, bulk.job_id]
    assert await store.claim("r1", 30.0, NOW + 10) is None
    got = await store.get(urgent.job_id)
    assert [t.state for t in got.history] == [JobState.QUEUED, JobState.RUNNING]


async def test_output_deltas_are_ordered_owned_and_not_duplicated(store: JobStore) -> None:
    await store.create(make_job())
    job = await store.claim("r1", 30.0, NOW)
    assert job is not None
    assert await store.append_output(job.job_id, "r1", Delta(0, (5, 6), " a b", 0), NOW)
    # a retry of the last delta (its reply was lost) succeeds and writes nothing
    assert await store.append_output(job.job_id, "r1", Delta(0, (5, 6), " a b", 0), NOW)
    assert not await store.append_output(job.job_id, "r2", Delta(2, (7,), " c", 4), NOW)
    assert not await store.append_output(job.job_id, "r2", Delta(0, (5, 6), " a b", 0), NOW)  # not its job
    assert await store.append_output(job.job_id, "r1", Delta(2, (7,), " c", 4), NOW)
    # an older delta does not continue the output: refused
    assert not await store.append_output(job.job_id, "r1", Delta(0, (5, 6), " a b", 0), NOW)
    assert await store.append_output(job.job_id, "r1", Delta(3, (8, 9), " d e", 6), NOW)
    got = await store.get(job.job_id)
    assert got.completion_tokens == 5 and got.text_chars == 10
    deltas = await store.read_deltas(job.job_id, 0)
    assert merge_deltas(deltas) == ([5, 6, 7, 8, 9], " a b c d e")
    assert merge_deltas(await store.read_deltas(job.job_id, 3), 3) == ([8, 9], " d e")
    assert merge_deltas(await store.read_deltas(job.job_id, 1), 1)[0] == [6, 7, 8, 9]
    assert await store.read_deltas(job.job_id, 5) == []


async def test_finish_is_one_terminal_transition(store: JobStore) -> None:
    await store.create(make_job())
    job = await store.claim("r1", 30.0, NOW)
    assert job is not None
    assert await store.finish(job.job_id, "r2", JobState.SUCCEEDED, NOW + 1, result=b"x") is None
    done = await store.finish(job.job_id, "r1", JobState.SUCCEEDED, NOW + 1, result=b"res")
    assert done is not None and done.state is JobState.SUCCEEDED and done.result == b"res"
    assert await store.finish(job.job_id, "r1", JobState.SUCCEEDED, NOW + 2, result=b"again") is None
    assert await store.finish(job.job_id, None, JobState.CANCELLED, NOW + 2) is None
    got = await store.get(job.job_id)
    assert got.result == b"res"
    assert [t.state for t in got.history].count(JobState.SUCCEEDED) == 1
    assert not await store.append_output(job.job_id, "r1", Delta(0, (1,), "x", 0), NOW + 3)
    assert not await store.heartbeat(job.job_id, "r1", 30.0, NOW + 3)
    with pytest.raises(ValueError):
        await store.finish(job.job_id, None, JobState.RUNNING, NOW)


async def test_cancel_queued_job_is_never_claimed(store: JobStore) -> None:
    job = make_job()
    await store.create(job)
    cancelled = await store.finish(job.job_id, None, JobState.CANCELLED, NOW + 1)
    assert cancelled is not None and cancelled.state is JobState.CANCELLED
    assert await store.claim("r1", 30.0, NOW + 2) is None


async def test_release_retries_then_dead_letters_with_last_error(store: JobStore) -> None:
    job = make_job(max_attempts=2)
    await store.create(job)
    first = await store.claim("r1", 30.0, NOW)
    assert first is not None and first.attempts == 1
    back = await store.release(job.job_id, "r1", NOW + 1, error=JobError(13, "boom 1"))
    assert back is not None and back.state is JobState.QUEUED
    second = await store.claim("r1", 30.0, NOW + 2)
    assert second is not None and second.job_id == job.job_id and second.attempts == 2
    dead = await store.release(job.job_id, "r1", NOW + 3, error=JobError(13, "boom 2"))
    assert dead is not None and dead.state is JobState.DEAD_LETTER
    assert dead.last_error == JobError(13, "boom 2")
    assert await store.claim("r1", 30.0, NOW + 4) is None
    page, _ = await store.list(frozenset({JobState.DEAD_LETTER}), 10, "")
    assert [j.job_id for j in page] == [job.job_id]


async def test_graceful_release_gives_the_attempt_back(store: JobStore) -> None:
    job = make_job(max_attempts=1)
    await store.create(job)
    assert await store.claim("r1", 30.0, NOW) is not None
    back = await store.release(job.job_id, "r1", NOW + 1, error=None, count_attempt=False)
    assert back is not None and back.state is JobState.QUEUED and back.attempts == 0
    again = await store.claim("r2", 30.0, NOW + 2)
    assert again is not None and again.attempts == 1 and again.owner == "r2"


async def test_expired_lease_is_claimed_by_another_replica(store: JobStore) -> None:
    job = make_job()
    await store.create(job)
    lease = 0.05
    t0 = time.time()
    first = await store.claim("dead", lease, t0)
    assert first is not None
    assert await store.claim("alive", lease, t0) is None  # lease still held
    deadline = time.monotonic() + 10
    taken = None
    while taken is None:  # the Redis lease is the stream entry's idle time: real time must pass
        assert time.monotonic() < deadline, "expired lease never claimed"
        await asyncio.sleep(lease)
        taken = await store.claim("alive", lease, time.time())
    assert taken.job_id == job.job_id and taken.owner == "alive" and taken.attempts == 2
    assert not await store.heartbeat(job.job_id, "dead", 30.0, time.time())
    assert await store.heartbeat(job.job_id, "alive", 30.0, time.time())
    assert await store.finish(job.job_id, "dead", JobState.SUCCEEDED, time.time()) is None
    assert await store.finish(job.job_id, "alive", JobState.SUCCEEDED, time.time()) is not None


async def test_heartbeat_keeps_the_lease(store: JobStore) -> None:
    await store.create(make_job())
    job = await store.claim("r1", 30.0, NOW)
    assert job is not None
    assert await store.heartbeat(job.job_id, "r1", 30.0, NOW + 20)
    assert await store.claim("r2", 30.0, NOW + 40) is None  # lease runs to NOW + 50


async def test_recover_requeues_the_dead_replicas_own_jobs(store: JobStore) -> None:
    a, b = make_job(now=NOW), make_job(now=NOW + 1)
    await store.create(a)
    await store.create(b)
    assert (await store.claim("r1", 300.0, NOW)).job_id == a.job_id
    assert await store.recover("r1", NOW + 1) == 1
    got = await store.get(a.job_id)
    assert got.state is JobState.QUEUED and got.attempts == 1 and got.last_error is not None
    claimed = [await store.claim("r1", 300.0, NOW + 2), await store.claim("r1", 300.0, NOW + 2)]
    assert sorted(j.job_id for j in claimed) == sorted([a.job_id, b.job_id])
    assert (await store.get(a.job_id)).attempts == 2


async def test_sweep_expires_queued_jobs_and_deletes_after_retention(store: JobStore) -> None:
    short = make_job(now=NOW, queue_ttl=10.0, retention=100.0)
    long = make_job(now=NOW, queue_ttl=1000.0)
    await store.create(short)
    await store.create(long)
    expired, deleted = await store.sweep(NOW + 5)
    assert expired == [] and deleted == 0
    expired, deleted = await store.sweep(NOW + 11)
    assert [j.job_id for j in expired] == [short.job_id] and deleted == 0
    got = await store.get(short.job_id)
    assert got.state is JobState.EXPIRED and got.expire_time == NOW + 11 + 100.0
    claimed = await store.claim("r1", 30.0, NOW + 12)
    assert claimed is not None and claimed.job_id == long.job_id
    _, deleted = await store.sweep(NOW + 11 + 101)
    assert deleted == 1
    with pytest.raises(JobNotFound):
        await store.get(short.job_id)


async def test_claim_expires_a_stale_queued_job_on_the_way(store: JobStore) -> None:
    job = make_job(now=NOW, queue_ttl=10.0)
    await store.create(job)
    assert await store.claim("r1", 30.0, NOW + 20) is None
    assert (await store.get(job.job_id)).state is JobState.EXPIRED


async def test_list_filters_and_pages(store: JobStore) -> None:
    jobs = [make_job(now=NOW + i) for i in range(7)]
    for j in jobs:
        await store.create(j)
    await store.finish(jobs[1].job_id, None, JobState.CANCELLED, NOW + 10)
    await store.finish(jobs[4].job_id, None, JobState.CANCELLED, NOW + 10)
    seen, token, pages = [], "", 0
    while True:
        page, token = await store.list(frozenset(), 3, token)
        seen += [j.job_id for j in page]
        pages += 1
        if not token:
            break
    assert seen == [j.job_id for j in jobs] and pages == 3
    page, token = await store.list(frozenset({JobState.CANCELLED}), 1, "")
    assert [j.job_id for j in page] == [jobs[1].job_id] and token
    page, token = await store.list(frozenset({JobState.CANCELLED}), 1, token)
    assert [j.job_id for j in page] == [jobs[4].job_id] and token == ""
    with pytest.raises(ValueError):
        await store.list(frozenset(), 3, "not-a-token")


async def test_delete_removes_job_and_output(store: JobStore) -> None:
    await store.create(make_job())
    job = await store.claim("r1", 30.0, NOW)
    assert job is not None
    await store.append_output(job.job_id, "r1", Delta(0, (1, 2), "ab", 0), NOW)
    await store.delete(job.job_id)
    with pytest.raises(JobNotFound):
        await store.get(job.job_id)
    assert await store.read_deltas(job.job_id) == []
    assert not await store.append_output(job.job_id, "r1", Delta(2, (3,), "c", 2), NOW)
    with pytest.raises(JobNotFound):
        await store.delete(job.job_id)
    page, _ = await store.list(frozenset(), 10, "")
    assert page == []


async def test_webhook_deliveries_are_recorded(store: JobStore) -> None:
    job = make_job()
    await store.create(job)
    await store.add_webhook_delivery(job.job_id, WebhookDelivery(1, NOW, 500, "server error"))
    await store.add_webhook_delivery(job.job_id, WebhookDelivery(2, NOW + 1, 200, ""))
    got = await store.get(job.job_id)
    assert [d.http_status for d in got.webhook_deliveries] == [500, 200]


async def test_wait_for_update_wakes_on_a_change(store: JobStore) -> None:
    await store.create(make_job())
    job = await store.claim("r1", 30.0, NOW)
    assert job is not None
    version = (await store.get(job.job_id)).version
    waiter = asyncio.create_task(store.wait_for_update(job.job_id, version, 30.0))
    assert await store.append_output(job.job_id, "r1", Delta(0, (1,), "a", 0), NOW)
    await asyncio.wait_for(waiter, 10)
    assert (await store.get(job.job_id)).version > version
    # an already newer version returns at once
    await asyncio.wait_for(store.wait_for_update(job.job_id, version, 30.0), 10)


async def test_every_stuck_job_of_a_dead_replica_is_claimable_at_once(store: JobStore) -> None:
    """A replica that takes over a dead one's jobs takes only what it starts: the rest stay
    claimable at once (by it or anyone), not parked for another lease."""
    jobs = [make_job(now=NOW + i) for i in range(8)]
    for j in jobs:
        await store.create(j)
    lease = 2.0  # every replica has the same lease (it is also the Redis entries' idle limit)
    t0 = time.time()
    for _ in jobs:
        assert await store.claim("dead", lease, t0) is not None
    deadline = time.monotonic() + 10
    first = None
    while first is None:  # the Redis lease is the stream entry's idle time: real time must pass
        assert time.monotonic() < deadline, "expired lease never claimed"
        await asyncio.sleep(lease)
        first = await store.claim("alive", lease, time.time())
    taken = [first]
    for _ in range(7):  # no further wait: every other stuck job is ready now
        job = await store.claim("alive" if len(taken) % 2 else "other", lease, time.time())
        assert job is not None, f"only {len(taken)} of 8 stuck jobs were claimable without another lease"
        taken.append(job)
    assert sorted(j.job_id for j in taken) == sorted(j.job_id for j in jobs)
    assert all(j.attempts == 2 for j in taken)


async def test_a_replica_never_takes_over_its_own_running_job(store: JobStore) -> None:
    """Its lease lapsed (say the store was unreachable for a while) but the replica still runs
    the job: claiming it again would run it twice on one replica."""
    await store.create(make_job())
    lease = 0.05
    job = await store.claim("r1", lease, time.time())
    assert job is not None
    deadline = time.monotonic() + 10
    while time.time() < job.lease_until + lease:  # wall time past the lease and the entry's idle time
        assert time.monotonic() < deadline
        await asyncio.sleep(lease)
    assert await store.claim("r1", lease, time.time()) is None
    assert await store.heartbeat(job.job_id, "r1", 30.0, time.time())
    assert (await store.get(job.job_id)).attempts == 1


def _bytes_written() -> int:
    """Bytes this process handed to write(2) so far (the SQLite store writes from this process)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


async def _redis_bytes_in(store: JobStore) -> int:
    info = await store.r.info("stats")  # type: ignore[attr-defined]
    return int(info["total_net_input_bytes"])


async def test_a_delta_does_not_rewrite_the_job_document(store: JobStore, stores: StoreFactory) -> None:
    """Output deltas are appended; the job document (a big params blob here) is written on
    state changes only, so the bytes written per delta do not grow with the params."""
    big = make_job()
    big.params = bytes(range(256)) * 4096  # 1 MiB of params
    await store.create(big)
    job = await store.claim("r1", 30.0, NOW)
    assert job is not None and job.job_id == big.job_id
    measure = _bytes_written if stores.kind == "sqlite" else None
    before = measure() if measure else await _redis_bytes_in(store)
    n = 40
    for i in range(n):
        assert await store.append_output(job.job_id, "r1", Delta(i, (i,), "x", i), NOW + i * 0.01)
    after = measure() if measure else await _redis_bytes_in(store)
    per_delta = (after - before) / n
    assert per_delta < 64 * 1024, f"{per_delta:.0f} bytes written per delta with 1 MiB of params"
    got = await store.get(job.job_id)
    assert got.completion_tokens == n == got.text_chars and got.params == big.params
    assert got.version > job.version and got.update_time == pytest.approx(NOW + (n - 1) * 0.01)
    assert [d.token_ids[0] for d in await store.read_deltas(job.job_id)] == list(range(n))
    assert await store.heartbeat(job.job_id, "r1", 30.0, NOW + 1)
    assert (await store.get(job.job_id)).lease_until == pytest.approx(NOW + 31)
    done = await store.finish(job.job_id, "r1", JobState.SUCCEEDED, NOW + 2, result=b"r")
    assert done is not None and done.completion_tokens == n and done.state is JobState.SUCCEEDED
    assert (await store.get(job.job_id)).completion_tokens == n


async def test_jobs_stored_before_progress_was_kept_apart_still_load(stores: StoreFactory) -> None:
    """A store written by an older version has the progress only in the job document."""
    store = await stores.open()
    await store.create(make_job())
    job = await store.claim("r1", 30.0, NOW)
    assert job is not None
    assert await store.append_output(job.job_id, "r1", Delta(0, (5, 6), " a b", 0), NOW + 1)
    full = await store.get(job.job_id)
    if stores.kind == "sqlite":  # the older file: the document up to date, no progress row
        import sqlite3

        await store.close()
        stores.opened.remove(store)
        with sqlite3.connect(stores.url[len("sqlite://"):]) as conn:
            conn.execute("UPDATE jobs SET doc = ? WHERE job_id = ?", (json.dumps(full.to_dict()), job.job_id))
            conn.execute("DELETE FROM job_progress")
        store = await stores.open()
    else:  # the older hash: no progress field
        await store.r.hset(f"{stores.prefix}:job:{job.job_id}", "doc", json.dumps(full.to_dict()))
        await store.r.hdel(f"{stores.prefix}:job:{job.job_id}", "progress")
    got = await store.get(job.job_id)
    assert got.to_dict() == full.to_dict()
    assert await store.append_output(job.job_id, "r1", Delta(2, (7,), " c", 4), NOW + 2)
    assert await store.heartbeat(job.job_id, "r1", 30.0, NOW + 3)
    got = await store.get(job.job_id)
    assert got.completion_tokens == 3 and got.text_chars == 6 and got.lease_until == NOW + 33
