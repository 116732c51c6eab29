"""Integration fixtures: a real grpc.aio server on an ephemeral 127.0.0.1 port, and stubs.

Reusable by every integration test:

- `synthetic_server`: a started server around a `SyntheticEngine` (a `SyntheticServer` with
  `.address` "127.0.0.1:PORT", `.engine`, `.config`, `.handle`). Timing / limits can be set
  with indirect parametrization:
  `@pytest.mark.parametrize("synthetic_server", [{"ttft_ms": 50, "max_pending_requests": 2}], indirect=True)`
  (keys: any SyntheticEngineConfig field, any AdmissionConfig field, `drain_grace_seconds`,
  `jobs`: a JobsConfig, default a fresh SQLite store; None serves Jobs as UNIMPLEMENTED;
  `security`: a SecurityConfig; `telemetry`: a TelemetryConfig).
- `synthetic_server_factory`: `await factory(**same_keys, engine=..., wait_ready=...)` for
  several servers or a hand-built engine; all are stopped at teardown.
- `channel`, `text_generation_stub`, `health_stub`, `jobs_stub`: connected to `synthetic_server`.
- `wait_until`: `await wait_until(predicate, timeout=5.0)` polls a condition with a bound.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc
from tokenrelay.v1 import jobs_pb2_grpc, text_generation_pb2_grpc

from tokenrelay_engines.base import AsyncEngine
from tokenrelay_engines.synthetic import SyntheticEngine, SyntheticEngineConfig
from tokenrelay_server.app import ServerHandle, start_server
from tokenrelay_server.config import AdmissionConfig, ServerConfig
from tokenrelay_server.jobs.model import JobsConfig

# Fast defaults so the suite stays quick on 2 shared cores.
TEST_SYNTHETIC = {"ttft_ms": 5.0, "itl_ms": 1.0}
_SYNTHETIC_FIELDS = {f.name for f in dataclasses.fields(SyntheticEngineConfig)}
_ADMISSION_FIELDS = {f.name for f in dataclasses.fields(AdmissionConfig)}
_SERVER_FIELDS = {"drain_grace_seconds", "health_check_interval_seconds", "warmup", "jobs", "security",
                  "telemetry"}


@dataclass(slots=True)
class SyntheticServer:
    address: str
    engine: AsyncEngine
    config: ServerConfig
    handle: ServerHandle

    @property
    def port(self) -> int:
        return self.handle.port


def make_server_config(**overrides: Any) -> ServerConfig:
    """A ServerConfig for 127.0.0.1:0 and the synthetic engine, with `overrides` sorted by owner."""
    unknown = set(overrides) - _SYNTHETIC_FIELDS - _ADMISSION_FIELDS - _SERVER_FIELDS
    if unknown:
        raise TypeError(f"unknown synthetic_server options: {sorted(unknown)}")
    synthetic = SyntheticEngineConfig(**{**TEST_SYNTHETIC, **{k: v for k, v in overrides.items()
                                                             if k in _SYNTHETIC_FIELDS}})
    admission = AdmissionConfig(**{k: v for k, v in overrides.items() if k in _ADMISSION_FIELDS})
    server = {k: v for k, v in overrides.items() if k in _SERVER_FIELDS}
    return ServerConfig(host="127.0.0.1", port=0, engine="synthetic", synthetic=synthetic,
                        admission=admission, **server)


@pytest.fixture
async def synthetic_server_factory(tmp_path) -> AsyncIterator[Callable[..., Awaitable[SyntheticServer]]]:
    handles: list[ServerHandle] = []

    async def factory(*, engine: AsyncEngine | None = None, wait_ready: bool = True,
                      **overrides: Any) -> SyntheticServer:
        # The Jobs service on a fresh SQLite file per server (pass jobs=None to leave it out).
        overrides.setdefault("jobs", JobsConfig(store_url=f"sqlite://{tmp_path}/jobs-{len(handles)}.sqlite",
                                                poll_interval=0.05))
        config = make_server_config(**overrides)
        engine = engine if engine is not None else SyntheticEngine(config.synthetic)
        handle = await start_server(config, engine, wait_ready=wait_ready)
        handles.append(handle)
        return SyntheticServer(address=f"127.0.0.1:{handle.port}", engine=engine, config=config, handle=handle)

    yield factory
    for handle in handles:
        await asyncio.wait_for(handle.stop(0), timeout=10)


@pytest.fixture
async def synthetic_server(request: pytest.FixtureRequest, synthetic_server_factory) -> SyntheticServer:
    overrides = getattr(request, "param", None) or {}
    return await synthetic_server_factory(**overrides)


@pytest.fixture
async def channel(synthetic_server: SyntheticServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(synthetic_server.address) as ch:
        await asyncio.wait_for(ch.channel_ready(), timeout=10)
        yield ch


@pytest.fixture
def text_generation_stub(channel: grpc.aio.Channel) -> text_generation_pb2_grpc.TextGenerationServiceStub:
    return text_generation_pb2_grpc.TextGenerationServiceStub(channel)


@pytest.fixture
def health_stub(channel: grpc.aio.Channel) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(channel)


@pytest.fixture
def jobs_stub(channel: grpc.aio.Channel) -> jobs_pb2_grpc.JobsServiceStub:
    return jobs_pb2_grpc.JobsServiceStub(channel)


async def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005) -> None:
    """Poll `predicate` until true; fail the test after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture
def wait_until() -> Callable[..., Awaitable[None]]:
    return _wait_until
