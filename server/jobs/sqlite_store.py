"""The embedded job store: one SQLite file in WAL mode, synchronous=FULL.

Every blocking sqlite call runs on one dedicated thread that owns the connection; each store
method is one `BEGIN IMMEDIATE` transaction, committed before the method returns (so a
submitted job is on disk before SubmitJob answers). Watchers in this process are woken by an
event swapped on every commit; writers in other processes are seen by polling.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from server.jobs.model import (
    Delta, Job, JobError, JobNotFound, JobState, WebhookDelivery, add_output, claim_job, expire_job, extend_lease,
    finish_job, record_delivery, recover_job, release_job, retention_over,
)
from server.jobs.store import JobStore, check_idempotency

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    tier_rank INTEGER NOT NULL,
    idem_key TEXT UNIQUE,
    queue_deadline REAL,
    delete_at REAL,
    lease_until REAL NOT NULL DEFAULT 0,
    owner TEXT NOT NULL DEFAULT '',
    version INTEGER NOT NULL DEFAULT 0,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, tier_rank, seq);
CREATE INDEX IF NOT EXISTS jobs_by_delete ON jobs(delete_at);
CREATE TABLE IF NOT EXISTS deltas (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    token_offset INTEGER NOT NULL,
    text_offset INTEGER NOT NULL,
    token_ids TEXT NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS deltas_by_job ON deltas(job_id, id);
"""


class SqliteJobStore(JobStore):
    def __init__(self, path: str, *, notify_poll: float = 0.5) -> None:
        self._path = path
        self._notify_poll = notify_poll
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobs-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._changed = asyncio.Event()

    # -- plumbing ---------------------------------------------------------------------------
    async def _run(self, fn: Callable[..., T], *args: object, write: bool = True) -> T:
        result = await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        if write:
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()
        return result

    def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise RuntimeError("job store is not open")
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def _open_sync(self) -> None:
        parent = os.path.dirname(self._path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=10.0)
        except sqlite3.Error as exc:
            raise OSError(f"cannot open the jobs store {self._path!r}: {exc}") from exc
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=10000")
        conn.executescript(_SCHEMA)
        self._conn = conn

    async def open(self) -> None:
        await self._run(self._open_sync, write=False)

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        await self._run(_close, write=False)
        self._executor.shutdown(wait=True)

    @staticmethod
    def _load(conn: sqlite3.Connection, job_id: str) -> Job | None:
        row = conn.execute("SELECT doc FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else Job.from_dict(json.loads(row[0]))

    @staticmethod
    def _save(conn: sqlite3.Connection, job: Job) -> None:
        conn.execute(
            "UPDATE jobs SET state=?, queue_deadline=?, delete_at=?, lease_until=?, owner=?, version=?, doc=?"
            " WHERE job_id=?",
            (job.state.value, job.queue_deadline if job.state is JobState.QUEUED else None, job.delete_time,
             job.lease_until, job.owner, job.version, json.dumps(job.to_dict()), job.job_id))

    def _mutate(self, job_id: str, fn: Callable[[Job], T]) -> tuple[Job, T]:
        """Load, change with `fn` (which returns False/None to write nothing), save: one transaction."""
        def body(conn: sqlite3.Connection) -> tuple[Job, T]:
            job = self._load(conn, job_id)
            if job is None:
                raise JobNotFound(job_id)
            out = fn(job)
            if out is not False and out is not None:
                self._save(conn, job)
            return job, out
        return self._tx(body)

    # -- the API side -----------------------------------------------------------------------
    async def create(self, job: Job) -> tuple[Job, bool]:
        def body(conn: sqlite3.Connection) -> tuple[Job, bool]:
            if job.idempotency_key:
                row = conn.execute("SELECT doc FROM jobs WHERE idem_key = ?", (job.idempotency_key,)).fetchone()
                if row is not None:
                    existing = Job.from_dict(json.loads(row[0]))
                    check_idempotency(existing, job)
                    return existing, False
            conn.execute(
                "INSERT INTO jobs (job_id, state, tier_rank, idem_key, queue_deadline, delete_at, lease_until,"
                " owner, version, doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.job_id, job.state.value, job.tier.rank, job.idempotency_key or None, job.queue_deadline,
                 None, 0.0, "", job.version, json.dumps(job.to_dict())))
            return job, True
        return await self._run(self._tx, body)

    async def get(self, job_id: str) -> Job:
        def body() -> Job:
            assert self._conn is not None
            job = self._load(self._conn, job_id)
            if job is None:
                raise JobNotFound(job_id)
            return job
        return await self._run(body, write=False)

    async def list(self, states: frozenset[JobState], page_size: int, page_token: str) -> tuple[list[Job], str]:
        after = _decode_token(page_token)

        def body() -> tuple[list[Job], str]:
            assert self._conn is not None
            sql = "SELECT seq, doc FROM jobs WHERE seq > ?"
            args: list[object] = [after]
            if states:
                sql += f" AND state IN ({','.join('?' * len(states))})"
                args += [s.value for s in states]
            sql += " ORDER BY seq LIMIT ?"
            rows = self._conn.execute(sql, (*args, page_size + 1)).fetchall()
            jobs = [Job.from_dict(json.loads(doc)) for _, doc in rows[:page_size]]
            token = _encode_token(rows[page_size - 1][0]) if len(rows) > page_size else ""
            return jobs, token
        return await self._run(body, write=False)

    async def delete(self, job_id: str) -> None:
        def body(conn: sqlite3.Connection) -> None:
            if conn.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,)).rowcount == 0:
                raise JobNotFound(job_id)
            conn.execute("DELETE FROM deltas WHERE job_id = ?", (job_id,))
        await self._run(self._tx, body)

    async def read_deltas(self, job_id: str, from_offset: int = 0) -> list[Delta]:
        def body() -> list[Delta]:
            assert self._conn is not None
            rows = self._conn.execute(
                "SELECT token_offset, token_ids, text, text_offset FROM deltas WHERE job_id = ? ORDER BY id",
                (job_id,)).fetchall()
            out = [Delta(o, tuple(json.loads(ids)), text, to) for o, ids, text, to in rows]
            return [d for d in out if d.offset + len(d.token_ids) > from_offset
                    or (not d.token_ids and d.offset >= from_offset)]
        return await self._run(body, write=False)

    async def wait_for_update(self, job_id: str, version: int, timeout: float) -> None:
        changed = self._changed

        def current() -> int | None:
            assert self._conn is not None
            row = self._conn.execute("SELECT version FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return None if row is None else row[0]
        now_version = await self._run(current, write=False)
        if now_version is None or now_version > version:
            return
        try:
            await asyncio.wait_for(changed.wait(), min(timeout, self._notify_poll))
        except TimeoutError:
            pass

    # -- the worker side --------------------------------------------------------------------
    async def claim(self, replica_id: str, lease: float, now: float) -> Job | None:
        def body(conn: sqlite3.Connection) -> Job | None:
            for _ in range(1000):
                row = conn.execute(
                    "SELECT doc FROM jobs WHERE state = 'running' AND lease_until < ? ORDER BY tier_rank, seq LIMIT 1",
                    (now,)).fetchone()
                if row is None:
                    row = conn.execute(
                        "SELECT doc FROM jobs WHERE state = 'queued' ORDER BY tier_rank, seq LIMIT 1").fetchone()
                if row is None:
                    return None
                job = Job.from_dict(json.loads(row[0]))
                runnable = claim_job(job, replica_id, lease, now)
                self._save(conn, job)
                if runnable:
                    return job
            return None
        return await self._run(self._tx, body)

    async def recover(self, replica_id: str, now: float) -> int:
        def body(conn: sqlite3.Connection) -> int:
            rows = conn.execute("SELECT doc FROM jobs WHERE state = 'running' AND owner = ?", (replica_id,)).fetchall()
            for (doc,) in rows:
                job = Job.from_dict(json.loads(doc))
                if recover_job(job, replica_id, now):  # always: the query picked jobs running here
                    self._save(conn, job)
            return len(rows)
        return await self._run(self._tx, body)

    async def heartbeat(self, job_id: str, replica_id: str, lease: float, now: float) -> bool:
        try:
            return (await self._run(self._mutate, job_id, lambda job: extend_lease(job, replica_id, lease, now),
                                    write=False))[1]
        except JobNotFound:
            return False

    async def append_output(self, job_id: str, replica_id: str, delta: Delta, now: float) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            job = self._load(conn, job_id)
            if job is None or not add_output(job, replica_id, delta, now):
                return False
            conn.execute("INSERT INTO deltas (job_id, token_offset, text_offset, token_ids, text) VALUES (?, ?, ?, ?, ?)",
                         (job_id, delta.offset, delta.text_offset, json.dumps(list(delta.token_ids)), delta.text))
            self._save(conn, job)
            return True
        return await self._run(self._tx, body)

    async def finish(self, job_id: str, replica_id: str | None, state: JobState, now: float, *,
                     result: bytes | None = None, error: JobError | None = None) -> Job | None:
        if not state.terminal:
            raise ValueError(f"finish needs a terminal state, not {state.value}")
        job, done = await self._run(
            self._mutate, job_id, lambda job: finish_job(job, replica_id, state, now, result=result, error=error))
        return job if done else None

    async def release(self, job_id: str, replica_id: str, now: float, *, error: JobError | None,
                      count_attempt: bool = True) -> Job | None:
        try:
            job, done = await self._run(
                self._mutate, job_id, lambda job: release_job(job, replica_id, error, now, count_attempt=count_attempt))
        except JobNotFound:
            return None
        return job if done else None

    async def add_webhook_delivery(self, job_id: str, delivery: WebhookDelivery) -> None:
        try:
            await self._run(self._mutate, job_id, lambda job: record_delivery(job, delivery))
        except JobNotFound:
            pass  # deleted meanwhile

    async def sweep(self, now: float) -> tuple[list[Job], int]:
        def body(conn: sqlite3.Connection) -> tuple[list[Job], int]:
            expired: list[Job] = []
            rows = conn.execute("SELECT doc FROM jobs WHERE state = 'queued' AND queue_deadline <= ?",
                                (now,)).fetchall()
            for (doc,) in rows:
                job = Job.from_dict(json.loads(doc))
                if expire_job(job, now):
                    self._save(conn, job)
                    expired.append(job)
            gone = [r[0] for r in conn.execute("SELECT doc FROM jobs WHERE delete_at <= ?", (now,)).fetchall()]
            deleted = 0
            for doc in gone:
                job = Job.from_dict(json.loads(doc))
                if retention_over(job, now):
                    conn.execute("DELETE FROM jobs WHERE job_id = ?", (job.job_id,))
                    conn.execute("DELETE FROM deltas WHERE job_id = ?", (job.job_id,))
                    deleted += 1
            return expired, deleted
        return await self._run(self._tx, body)


def _encode_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"s:{seq}".encode()).decode()


def _decode_token(token: str) -> int:
    if not token:
        return 0
    try:
        raw = base64.urlsafe_b64decode(token.encode()).decode()
        if not raw.startswith("s:"):
            raise ValueError
        return int(raw[2:])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("page_token is not one this server issued") from exc
