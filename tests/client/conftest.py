"""Fixtures for the client's own suite: it needs only the client distribution (grpcio +
protobuf), pytest and pytest-asyncio, so it also runs in the oldest-versions virtualenv
(scripts/ci_client_oldest.sh). Servers here are real grpc.aio servers on ephemeral 127.0.0.1
ports built from the generated servicer base classes; tests of the real tokenrelay server live
in tests/integration."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from tokenrelay.v1 import jobs_pb2_grpc, text_generation_pb2_grpc

CALL_BOUND = 30.0  # every wait in this suite is bounded by this many seconds


async def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking Client call off the event loop that serves the in-process server."""
    return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), CALL_BOUND)


@pytest.fixture
async def tiny_server() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """`await tiny_server(generation_servicer, jobs_servicer)` -> "127.0.0.1:PORT"."""
    servers: list[grpc.aio.Server] = []

    async def start(generation: Any = None, jobs: Any = None) -> str:
        server = grpc.aio.server()
        if generation is not None:
            text_generation_pb2_grpc.add_TextGenerationServiceServicer_to_server(generation, server)
        if jobs is not None:
            jobs_pb2_grpc.add_JobsServiceServicer_to_server(jobs, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await asyncio.wait_for(server.stop(0), CALL_BOUND)
