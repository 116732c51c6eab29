"""The embedded job store: one SQLite file in WAL mode, synchronous=FULL.

Every blocking sqlite call runs on one dedicated thread that owns the connection; each store
method is one `BEGIN IMMEDIATE` transaction, committed before the method returns (so a
submitted job is on disk before SubmitJob answers). Watchers in this process are woken by an
event swapped on every commit; writers in other processes are seen by polling.

Tables: `jobs` holds each job's document (JSON, params included), rewritten on state changes
only; `job_progress` its Progress (a small row: lease, output counters, version), rewritten
on every delta and heartbeat; `deltas` the output, append-only.
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

from tokenrelay_server.jobs.changes import (
    add_output, delta_persisted, expire_job, extend_lease, finish_job, record_delivery, recover_job, release_job,
)
from tokenrelay_server.jobs.model import (
    Delta, Job, JobError, JobNotFound, JobState, Progress, WebhookDelivery, claim_job, retention_over,
)
from tokenrelay_server.jobs.store import JobStore, StoreUnavailable, check_idempotency

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
CREATE TABLE IF NOT EXISTS job_progress (
    job_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    owner TEXT NOT NULL,
    lease_until REAL NOT NULL,
    completion_tokens INTEGER NOT NULL,
    text_chars INTEGER NOT NULL,
    update_time REAL NOT NULL,
    version INTEGER NOT NULL
) WITHOUT ROWID;
-- files written before job_progress existed: their documents are up to date
INSERT OR IGNORE INTO job_progress
    SELECT job_id, json_extract(doc, '$.state'), json_extract(doc, '$.owner'), json_extract(doc, '$.lease_until'),
           json_extract(doc, '$.completion_tokens'), json_extract(doc, '$.text_chars'),
           json_extract(doc, '$.update_time'), json_extract(doc, '$.version') FROM jobs
    WHERE job_id NOT IN (SELECT job_id FROM job_progress);
"""
_PROGRESS = "p.state, p.owner, p.lease_until, p.completion_tokens, p.text_chars, p.update_time, p.version"
_SELECT = f"SELECT j.doc, {_PROGRESS} FROM jobs j JOIN job_progress p USING (job_id)"


def _job(row: tuple) -> Job:
    """A row of `_SELECT`: the document with its progress applied."""
    job = Job.from_dict(json.loads(row[0]))
    job.apply(Progress.from_list(list(row[1:8])))
    return job


class SqliteJobStore(JobStore):
    def __init__(self, path: str, *, notify_poll: float = 0.5) -> None:
        self._path = path
        self._notify_poll = notify_poll
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobs-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._changed = asyncio.Event()

    # -- plumbing ---------------------------------------------------------------------------
    async def _run(self, fn: Callable[..., T], *args: object, write: bool = True) -> T:
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.OperationalError as exc:  # locked past busy_timeout, I/O error: worth a retry
            if any(w in str(exc) for w in ("locked", "busy", "disk I/O")):
                raise StoreUnavailable(f"sqlite: {exc}") from exc
            raise
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
        row = conn.execute(f"{_SELECT} WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    @staticmethod
    def _save(conn: sqlite3.Connection, job: Job) -> None:
        """A state change: the document and its progress."""
        conn.execute(
            "UPDATE jobs SET state=?, queue_deadline=?, delete_at=?, lease_until=?, owner=?, version=?, doc=?"
            " WHERE job_id=?",
            (job.state.value, job.queue_deadline if job.state is JobState.QUEUED else None, job.delete_time,
             job.lease_until, job.owner, job.version, json.dumps(job.to_dict()), job.job_id))
        SqliteJobStore._save_progress(conn, job.job_id, job.progress)

    @staticmethod
    def _save_progress(conn: sqlite3.Connection, job_id: str, p: Progress) -> None:
        conn.execute("INSERT OR REPLACE INTO job_progress (job_id, state, owner, lease_until, completion_tokens,"
                     " text_chars, update_time, version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (job_id, *p.to_list()))

    @staticmethod
    def _load_progress(conn: sqlite3.Connection, job_id: str) -> Progress | None:
        row = conn.execute(f"SELECT {_PROGRESS} FROM job_progress p WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else Progress.from_list(list(row))

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
                row = conn.execute(f"{_SELECT} WHERE j.idem_key = ?", (job.idempotency_scope,)).fetchone()
                if row is not None:
                    existing = _job(row)
                    check_idempotency(existing, job)
                    return existing, False
            conn.execute(
                "INSERT INTO jobs (job_id, state, tier_rank, idem_key, queue_deadline, delete_at, lease_until,"
                " owner, version, doc) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.job_id, job.state.value, job.tier.rank, job.idempotency_scope or None, job.queue_deadline,
                 None, 0.0, "", job.version, json.dumps(job.to_dict())))
            self._save_progress(conn, job.job_id, job.progress)
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

    async def list(self, states: frozenset[JobState], page_size: int, page_token: str,
                   tenant: str | None = None) -> tuple[list[Job], str]:
        after = _decode_token(page_token)

        def body() -> tuple[list[Job], str]:
            assert self._conn is not None
            sql = f"{_SELECT.replace('SELECT ', 'SELECT j.seq, ', 1)} WHERE j.seq > ?"
            args: list[object] = [after]
            if states:
                sql += f" AND j.state IN ({','.join('?' * len(states))})"
                args += [s.value for s in states]
            if tenant is not None:
                sql += " AND coalesce(json_extract(j.doc, '$.tenant'), '') = ?"
                args.append(tenant)
            sql += " ORDER BY j.seq LIMIT ?"
            rows = self._conn.execute(sql, (*args, page_size + 1)).fetchall()
            jobs = [_job(row[1:]) for row in rows[:page_size]]
            token = _encode_token(rows[page_size - 1][0]) if len(rows) > page_size else ""
            return jobs, token
        return await self._run(body, write=False)

    async def delete(self, job_id: str) -> None:
        def body(conn: sqlite3.Connection) -> None:
            if conn.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,)).rowcount == 0:
                raise JobNotFound(job_id)
            conn.execute("DELETE FROM deltas WHERE job_id = ?", (job_id,))
            conn.execute("DELETE FROM job_progress WHERE job_id = ?", (job_id,))
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
            row = self._conn.execute("SELECT version FROM job_progress WHERE job_id = ?", (job_id,)).fetchone()
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
                row = conn.execute(  # taken_over_by, as a query
                    f"{_SELECT} WHERE j.state = 'running' AND p.lease_until < ? AND p.owner != ?"
                    " ORDER BY j.tier_rank, j.seq LIMIT 1", (now, replica_id)).fetchone()
                if row is None:
                    row = conn.execute(
                        f"{_SELECT} WHERE j.state = 'queued' ORDER BY j.tier_rank, j.seq LIMIT 1").fetchone()
                if row is None:
                    return None
                job = _job(row)
                runnable = claim_job(job, replica_id, lease, now)
                self._save(conn, job)
                if runnable:
                    return job
            return None
        return await self._run(self._tx, body)

    async def recover(self, replica_id: str, now: float) -> int:
        def body(conn: sqlite3.Connection) -> int:
            rows = conn.execute(f"{_SELECT} WHERE j.state = 'running' AND p.owner = ?", (replica_id,)).fetchall()
            for row in rows:
                job = _job(row)
                if recover_job(job, replica_id, now):  # always: the query picked jobs running here
                    self._save(conn, job)
            return len(rows)
        return await self._run(self._tx, body)

    async def heartbeat(self, job_id: str, replica_id: str, lease: float, now: float) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            p = self._load_progress(conn, job_id)
            if p is None or not extend_lease(p, replica_id, lease, now):
                return False
            self._save_progress(conn, job_id, p)
            return True
        return await self._run(self._tx, body, write=False)

    async def append_output(self, job_id: str, replica_id: str, delta: Delta, now: float) -> bool:
        def body(conn: sqlite3.Connection) -> bool:
            p = self._load_progress(conn, job_id)
            if p is not None and delta_persisted(p, replica_id, delta):
                return True  # a retried write that did commit
            if p is None or not add_output(p, replica_id, delta, now):
                return False
            conn.execute("INSERT INTO deltas (job_id, token_offset, text_offset, token_ids, text) VALUES (?, ?, ?, ?, ?)",
                         (job_id, delta.offset, delta.text_offset, json.dumps(list(delta.token_ids)), delta.text))
            self._save_progress(conn, job_id, p)
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
            rows = conn.execute(f"{_SELECT} WHERE j.state = 'queued' AND j.queue_deadline <= ?", (now,)).fetchall()
            for row in rows:
                job = _job(row)
                if expire_job(job, now):
                    self._save(conn, job)
                    expired.append(job)
            gone = conn.execute(f"{_SELECT} WHERE j.delete_at <= ?", (now,)).fetchall()
            deleted = 0
            for row in gone:
                job = _job(row)
                if retention_over(job, now):
                    for table in ("jobs", "deltas", "job_progress"):
                        conn.execute(f"DELETE FROM {table} WHERE job_id = ?", (job.job_id,))
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
