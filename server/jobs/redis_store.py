"""The shared job store: Redis, for many replicas.

Keys (prefix `tr`):
  tr:job:{id}          hash: doc (the job as JSON, written on state changes), progress (its Progress as
                       JSON, written on every delta and heartbeat), state, entry (its queue stream
                       entry while claimed)
  tr:deltas:{id}       list: persisted output deltas, for resumable watches
  tr:ev:{id}           stream: one entry per job version (id `{version}-0`); watchers XREAD BLOCK it
  tr:idem:{key}        string: idempotency key -> job id
  tr:index             sorted set (lex): `{create_ns}:{id}`, for ListJobs
  tr:qdeadline         sorted set: queued job -> queue deadline, for TTL expiry
  tr:deleteat          sorted set: ended job -> delete time, for retention
  tr:queue:{tier}      stream + consumer group `workers`: the queue, one per priority tier

The queue streams are `server.jobs.redis_queue`: a claim takes new entries (XREADGROUP) or
those of dead replicas (XAUTOCLAIM after a lease without heartbeat); the terminal transition
XACKs and deletes the entry. Every job change is one WATCH/MULTI transaction on the job hash,
its queue side effects staged in the same MULTI; ended jobs get a key TTL past retention.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from tokenrelay_server.jobs.changes import (
    add_output, delta_persisted, expire_job, extend_lease, finish_job, record_delivery, recover_job, release_job,
    taken_over_by,
)
from tokenrelay_server.jobs.model import Delta, Job, JobError, JobNotFound, JobState, Progress, WebhookDelivery, claim_job
from tokenrelay_server.jobs.redis_keys import RedisKeys, decode_token, encode_token, load_job
from tokenrelay_server.jobs.redis_queue import RedisQueue, redis_call
from tokenrelay_server.jobs.store import JobStore, check_idempotency

_TTL_MARGIN = 60  # key TTL past retention; the sweeper deletes on time, the TTL is the backstop
_CONNECT_TIMEOUT = 5.0  # seconds; an unreachable Redis is an outage (StoreUnavailable), not a hang
_SOCKET_TIMEOUT = 15.0  # seconds; above the longest XREAD BLOCK a watcher issues
Extra = Callable[[Any, Job, str | None], None]


class RedisJobStore(JobStore):
    def __init__(self, url: str, *, prefix: str = "tr") -> None:
        self._url = url
        self._k = RedisKeys(prefix)
        self._r: aioredis.Redis | None = None
        self._q = RedisQueue(prefix)

    @property
    def r(self) -> aioredis.Redis:
        if self._r is None:
            raise RuntimeError("job store is not open")
        return self._r

    # -- lifecycle --------------------------------------------------------------------------
    @redis_call
    async def open(self) -> None:
        # a pooled connection that died with a Redis restart is reconnected and the command
        # retried (briefly) before the call gives up with StoreUnavailable
        self._r = aioredis.from_url(self._url, decode_responses=True, socket_connect_timeout=_CONNECT_TIMEOUT,
                                    socket_timeout=_SOCKET_TIMEOUT,
                                    retry=Retry(ExponentialBackoff(cap=0.5, base=0.02), 3),
                                    retry_on_error=[RedisConnectionError, RedisTimeoutError])
        await self._r.ping()
        await self._q.create_groups(self._r)

    @redis_call
    async def ping(self) -> None:
        await self.r.ping()

    @redis_call
    async def close(self) -> None:
        if self._r is not None:
            await self._r.aclose()
            self._r = None

    # -- the one write path -----------------------------------------------------------------
    def _stage_save(self, pipe: Any, job: Job, before: Job, entry: str | None) -> None:
        """Queue the commands that persist `job` (changed from `before`) inside a MULTI."""
        key = self._k.job(job.job_id)
        pipe.hset(key, mapping=self._fields(job))
        if job.version > before.version:
            pipe.xadd(self._k.ev(job.job_id), {"v": str(job.version)}, id=f"{job.version}-0", maxlen=32,
                      approximate=True)
        if job.state is not before.state and job.state is not JobState.RUNNING:
            if entry:  # the claimed queue entry is done with
                self._q.stage_ack(pipe, entry)
                pipe.hdel(key, "entry")
        if job.state.terminal and not before.state.terminal:
            pipe.zrem(self._k.qdeadline, job.job_id)
            delete_time = job.delete_time
            if delete_time is not None:
                pipe.zadd(self._k.deleteat, {job.job_id: delete_time})
                ttl = int(job.retention) + _TTL_MARGIN
                for k in (key, self._k.deltas(job.job_id), self._k.ev(job.job_id)):
                    pipe.expire(k, ttl)
                if job.idempotency_key:
                    pipe.expire(self._k.idem(job.idempotency_scope), ttl)
        elif job.state is JobState.QUEUED and before.state is not JobState.QUEUED:
            self._q.stage_push(pipe, job.tier, job.job_id)  # re-queued: a fresh entry

    @staticmethod
    def _fields(job: Job) -> dict[str, str]:
        return {"doc": json.dumps(job.to_dict()), "progress": json.dumps(job.progress.to_list()),
                "state": job.state.value}

    async def _mutate(self, job_id: str, fn: Callable[[Job], Any], extra: Extra | None = None) -> tuple[Job, Any]:
        """WATCH the job, change it with `fn` (False/None: write nothing), MULTI/EXEC; retried on conflict."""
        key = self._k.job(job_id)
        while True:
            async with self.r.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    doc, entry, progress = await pipe.hmget(key, ["doc", "entry", "progress"])
                    if doc is None:
                        raise JobNotFound(job_id)
                    before = load_job(doc, progress)
                    job = load_job(doc, progress)
                    out = fn(job)
                    if out is False or out is None:
                        await pipe.unwatch()
                        return job, out
                    pipe.multi()
                    self._stage_save(pipe, job, before, entry)
                    if extra is not None:
                        extra(pipe, job, entry)
                    await pipe.execute()
                    return job, out
                except WatchError:
                    continue

    async def _mutate_progress(self, job_id: str, fn: Callable[[Progress], bool],
                               extra: Callable[[Any, str | None], None] | None = None) -> bool:
        """Like _mutate for a change of the job's Progress only: the document is neither read
        nor written (a delta or a heartbeat costs a few small fields, whatever the params)."""
        key = self._k.job(job_id)
        while True:
            async with self.r.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    raw, entry = await pipe.hmget(key, ["progress", "entry"])
                    if raw is None:
                        doc = await pipe.hget(key, "doc")
                        if doc is None:
                            raise JobNotFound(job_id)
                        p = Job.from_dict(json.loads(doc)).progress
                    else:
                        p = Progress.from_list(json.loads(raw))
                    version = p.version
                    if not fn(p):
                        await pipe.unwatch()
                        return False
                    pipe.multi()
                    pipe.hset(key, "progress", json.dumps(p.to_list()))
                    if p.version > version:
                        pipe.xadd(self._k.ev(job_id), {"v": str(p.version)}, id=f"{p.version}-0", maxlen=32,
                                  approximate=True)
                    if extra is not None:
                        extra(pipe, entry)
                    await pipe.execute()
                    return True
                except WatchError:
                    continue

    # -- the API side -----------------------------------------------------------------------
    @redis_call
    async def create(self, job: Job) -> tuple[Job, bool]:
        idem = self._k.idem(job.idempotency_scope) if job.idempotency_key else None
        while True:
            async with self.r.pipeline(transaction=True) as pipe:
                try:
                    if idem is not None:
                        await pipe.watch(idem)
                        existing_id = await pipe.get(idem)
                        if existing_id is not None:
                            doc, progress = await self.r.hmget(self._k.job(existing_id), ["doc", "progress"])
                            if doc is not None:
                                await pipe.unwatch()
                                existing = load_job(doc, progress)
                                check_idempotency(existing, job)
                                return existing, False
                    pipe.multi()
                    if idem is not None:
                        pipe.set(idem, job.job_id)
                    pipe.hset(self._k.job(job.job_id), mapping=self._fields(job))
                    pipe.zadd(self._k.index, {f"{int(job.create_time * 1e9):020d}:{job.job_id}": 0})
                    if job.queue_deadline is not None:
                        pipe.zadd(self._k.qdeadline, {job.job_id: job.queue_deadline})
                    self._q.stage_push(pipe, job.tier, job.job_id)
                    await pipe.execute()
                    return job, True
                except WatchError:
                    continue

    @redis_call
    async def get(self, job_id: str) -> Job:
        doc, progress = await self.r.hmget(self._k.job(job_id), ["doc", "progress"])
        if doc is None:
            raise JobNotFound(job_id)
        return load_job(doc, progress)

    @redis_call
    async def list(self, states: frozenset[JobState], page_size: int, page_token: str,
                   tenant: str | None = None) -> tuple[list[Job], str]:
        start = "-" if not page_token else "(" + decode_token(page_token)
        found: list[tuple[str, Job]] = []
        chunk = max(page_size * 2, 50)
        while len(found) <= page_size:
            members = await self.r.zrangebylex(self._k.index, start, "+", start=0, num=chunk)
            if not members:
                break
            async with self.r.pipeline(transaction=False) as pipe:
                for m in members:
                    pipe.hmget(self._k.job(m.split(":", 1)[1]), ["doc", "progress"])
                docs = await pipe.execute()
            missing = [m for m, (d, _) in zip(members, docs) if d is None]
            if missing:
                await self.r.zrem(self._k.index, *missing)
            for m, (d, progress) in zip(members, docs):
                if d is None:
                    continue
                job = load_job(d, progress)
                if (not states or job.state in states) and (tenant is None or job.tenant == tenant):
                    found.append((m, job))
            start = "(" + members[-1]
            if len(members) < chunk:
                break
        page = found[:page_size]
        token = encode_token(page[-1][0]) if len(found) > page_size else ""
        return [j for _, j in page], token

    @redis_call
    async def delete(self, job_id: str) -> None:
        job = await self.get(job_id)
        entry = await self.r.hget(self._k.job(job_id), "entry")
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self._k.job(job_id), self._k.deltas(job_id))
            pipe.xadd(self._k.ev(job_id), {"v": "deleted"}, id=f"{job.version + 1}-0")
            pipe.expire(self._k.ev(job_id), 60)
            if job.idempotency_key:
                pipe.delete(self._k.idem(job.idempotency_scope))
            pipe.zrem(self._k.index, f"{int(job.create_time * 1e9):020d}:{job_id}")
            pipe.zrem(self._k.qdeadline, job_id)
            pipe.zrem(self._k.deleteat, job_id)
            if entry:
                self._q.stage_ack(pipe, entry)
            await pipe.execute()

    @redis_call
    async def read_deltas(self, job_id: str, from_offset: int = 0) -> list[Delta]:
        raw = await self.r.lrange(self._k.deltas(job_id), 0, -1)
        out = []
        for item in raw:
            o, to, ids, text = json.loads(item)
            if o + len(ids) > from_offset or (not ids and o >= from_offset):
                out.append(Delta(o, tuple(ids), text, to))
        return out

    @redis_call
    async def wait_for_update(self, job_id: str, version: int, timeout: float) -> None:
        await self.r.xread({self._k.ev(job_id): f"{version}-0"}, count=1, block=max(1, int(timeout * 1000)))

    # -- the worker side --------------------------------------------------------------------
    @redis_call
    async def claim(self, replica_id: str, lease: float, now: float) -> Job | None:
        async for entry, job_id in self._q.candidates(self.r, replica_id, lease):
            job = await self._claim_entry(entry, job_id, replica_id, lease, now)
            if job is not None:
                return job
        return None

    async def _claim_entry(self, entry: str, job_id: str | None, replica_id: str, lease: float,
                           now: float) -> Job | None:
        if not job_id:
            await self._q.ack(self.r, entry)
            return None

        def decide(job: Job) -> str | bool:
            if job.state is JobState.RUNNING and not taken_over_by(job, replica_id, now):
                return False  # its replica still heart-beats (or it is ours): the owner's touch takes it back
            if job.state.terminal:
                return False  # a stale entry
            return "run" if claim_job(job, replica_id, lease, now) else "not-runnable"  # both write

        def staged(pipe: Any, job: Job, old_entry: str | None) -> None:
            if job.state is JobState.RUNNING:
                pipe.hset(self._k.job(job.job_id), "entry", entry)
                pipe.zrem(self._k.qdeadline, job.job_id)
                if old_entry and old_entry != entry:
                    self._q.stage_ack(pipe, old_entry)
            else:
                self._q.stage_ack(pipe, entry)

        try:
            job, verdict = await self._mutate(job_id, decide, staged)
        except JobNotFound:
            await self._q.ack(self.r, entry)
            return None
        if verdict == "run":
            return job
        if verdict is False:
            state = await self.r.hget(self._k.job(job_id), "state")
            if state is None or JobState(state).terminal:
                await self._q.ack(self.r, entry)
        return None

    @redis_call
    async def recover(self, replica_id: str, now: float) -> int:
        count = 0
        for entry, job_id in await self._q.pending(self.r, replica_id):
            def ack(pipe: Any, job: Job, old_entry: str | None, entry: str = entry) -> None:
                if old_entry != entry:
                    self._q.stage_ack(pipe, entry)

            done = False
            if job_id:
                try:
                    done = bool((await self._mutate(job_id, lambda job: recover_job(job, replica_id, now), ack))[1])
                except JobNotFound:
                    pass
            if done:
                count += 1
                continue
            state = await self.r.hget(self._k.job(job_id), "state") if job_id else None
            if state is None or JobState(state).terminal:
                await self._q.ack(self.r, entry)
        return count

    @redis_call
    async def heartbeat(self, job_id: str, replica_id: str, lease: float, now: float) -> bool:
        def reset_idle(pipe: Any, entry: str | None) -> None:
            if entry:
                self._q.stage_touch(pipe, entry, replica_id)

        try:
            return await self._mutate_progress(job_id, lambda p: extend_lease(p, replica_id, lease, now), reset_idle)
        except JobNotFound:
            return False

    @redis_call
    async def append_output(self, job_id: str, replica_id: str, delta: Delta, now: float) -> bool:
        def push(pipe: Any, entry: str | None) -> None:
            pipe.rpush(self._k.deltas(job_id), json.dumps([delta.offset, delta.text_offset,
                                                         list(delta.token_ids), delta.text]))

        persisted: list[bool] = []

        def change(p: Progress) -> bool:
            persisted.append(delta_persisted(p, replica_id, delta))
            return not persisted[-1] and add_output(p, replica_id, delta, now)

        try:
            return await self._mutate_progress(job_id, change, push) or persisted[-1]
        except JobNotFound:
            return False

    @redis_call
    async def finish(self, job_id: str, replica_id: str | None, state: JobState, now: float, *,
                     result: bytes | None = None, error: JobError | None = None) -> Job | None:
        if not state.terminal:
            raise ValueError(f"finish needs a terminal state, not {state.value}")
        job, done = await self._mutate(
            job_id, lambda job: finish_job(job, replica_id, state, now, result=result, error=error))
        return job if done else None

    @redis_call
    async def release(self, job_id: str, replica_id: str, now: float, *, error: JobError | None,
                      count_attempt: bool = True) -> Job | None:
        try:
            job, done = await self._mutate(
                job_id, lambda job: release_job(job, replica_id, error, now, count_attempt=count_attempt))
        except JobNotFound:
            return None
        return job if done else None

    @redis_call
    async def add_webhook_delivery(self, job_id: str, delivery: WebhookDelivery) -> None:
        try:
            await self._mutate(job_id, lambda job: record_delivery(job, delivery))
        except JobNotFound:
            pass

    @redis_call
    async def sweep(self, now: float) -> tuple[list[Job], int]:
        expired: list[Job] = []
        for job_id in await self.r.zrangebyscore(self._k.qdeadline, "-inf", now):
            try:
                job, done = await self._mutate(job_id, lambda job: expire_job(job, now))
            except JobNotFound:
                await self.r.zrem(self._k.qdeadline, job_id)
                continue
            if done:
                expired.append(job)
            else:
                await self.r.zrem(self._k.qdeadline, job_id)  # started or ended: no longer queued
        deleted = 0
        for job_id in await self.r.zrangebyscore(self._k.deleteat, "-inf", now):
            try:
                await self.delete(job_id)
                deleted += 1
            except JobNotFound:
                await self.r.zrem(self._k.deleteat, job_id)
        return expired, deleted

