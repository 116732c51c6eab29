"""Fixtures for the jobs tests: a real redis-server subprocess, and both job stores."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from server.jobs.model import Job, JobState, JobTier, Transition, new_job_id
from server.jobs.redis_store import RedisJobStore
from server.jobs.sqlite_store import SqliteJobStore
from server.jobs.store import JobStore


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (apt-get install redis-server): the Redis job store tests need it"
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert proc.poll() is None, "redis-server exited at startup"
            assert time.monotonic() < deadline, "redis-server did not answer within 10 s"
            time.sleep(0.02)  # polling a subprocess's port: there is nothing to wait on
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class StoreFactory:
    """Opens stores of one kind on one shared location (to test reopening)."""

    def __init__(self, kind: str, tmp_path: Path, redis_url: str | None) -> None:
        self.kind = kind
        self._path = tmp_path / "jobs.db"
        self._redis_url = redis_url
        self._prefix = f"t{uuid.uuid4().hex[:12]}"
        self.opened: list[JobStore] = []

    async def open(self) -> JobStore:
        if self.kind == "sqlite":
            store: JobStore = SqliteJobStore(str(self._path), notify_poll=0.2)
        else:
            assert self._redis_url is not None
            store = RedisJobStore(self._redis_url, prefix=self._prefix)
        await store.open()
        self.opened.append(store)
        return store

    @property
    def url(self) -> str:
        return f"sqlite://{self._path}" if self.kind == "sqlite" else f"{self._redis_url}"


@pytest.fixture(params=["sqlite", "redis"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreFactory]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    factory = StoreFactory(request.param, tmp_path, url)
    yield factory
    for s in factory.opened:
        await s.close()


@pytest.fixture
async def store(stores: StoreFactory) -> JobStore:
    return await stores.open()


def make_job(*, tier: JobTier = JobTier.STANDARD, now: float = 1000.0, key: str = "", fingerprint: str = "fp",
             max_attempts: int = 3, queue_ttl: float = 0.0, retention: float = 0.0, max_tokens: int = 8) -> Job:
    return Job(job_id=new_job_id(), tier=tier, params=b"\x01\x02", fingerprint=fingerprint, seed=7,
               max_tokens=max_tokens, idempotency_key=key, max_attempts=max_attempts, queue_ttl=queue_ttl,
               retention=retention, create_time=now, update_time=now,
               history=[Transition(JobState.QUEUED, now)], labels={"team": "a"})
