"""Fixtures for the jobs tests: a real redis-server subprocess, both job stores, and a Jobs
gRPC server on an ephemeral port (`jobs_server`)."""

from __future__ import annotations

import base64
import selectors
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from tokenrelay.v1 import jobs_pb2_grpc

from tokenrelay_engines.base import AsyncEngine
from tokenrelay_server.jobs.component import JobsComponent
from tokenrelay_server.jobs.model import JobsConfig
from tokenrelay_server.jobs.redis_store import RedisJobStore
from tokenrelay_server.jobs.sqlite_store import SqliteJobStore
from tokenrelay_server.jobs.store import JobStore

from tests.jobs.helpers import started_synthetic

FAST = dict(poll_interval=0.05, sweep_interval=0.05, lease=5.0, stop_grace=0.0)
SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123").decode()


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
                             "--appendonly", "no", "--dir", str(workdir), "--loglevel", "notice"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 15
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            seen = b""
            while b"Ready to accept connections" not in seen:  # redis-server's own readiness line
                left = deadline - time.monotonic()
                assert left > 0 and proc.poll() is None, f"redis-server did not start: {seen[-500:]!r}"
                if sel.select(timeout=left):
                    seen += proc.stdout.read1(4096)
        proc.stdout.close()
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
        self.prefix = f"t{uuid.uuid4().hex[:12]}"
        self.opened: list[JobStore] = []

    async def open(self) -> JobStore:
        if self.kind == "sqlite":
            store: JobStore = SqliteJobStore(str(self._path), notify_poll=0.2)
        else:
            assert self._redis_url is not None
            store = RedisJobStore(self._redis_url, prefix=self.prefix)
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


@dataclass(slots=True)
class JobsServer:
    stub: jobs_pb2_grpc.JobsServiceStub
    component: JobsComponent
    engine: AsyncEngine


@pytest.fixture
async def jobs_server(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[JobsServer]]]:
    """`await jobs_server(engine=..., store_url=..., **JobsConfig fields)`: the Jobs service alone
    on a grpc.aio server (SQLite by default); all are stopped at teardown."""
    started: list[tuple[grpc.aio.Server, grpc.aio.Channel, JobsComponent]] = []

    async def start(*, engine: AsyncEngine | None = None, store_url: str | None = None, **config) -> JobsServer:
        engine = engine or await started_synthetic()
        cfg = JobsConfig(store_url=store_url or f"sqlite://{tmp_path}/jobs-{len(started)}.db",
                         **{**FAST, **config})
        component = JobsComponent(cfg, engine)
        server = grpc.aio.server()
        component.register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await component.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        started.append((server, channel, component))
        return JobsServer(jobs_pb2_grpc.JobsServiceStub(channel), component, engine)

    yield start
    for server, channel, component in started:
        await channel.close()
        await server.stop(0)
        await component.stop(0)
