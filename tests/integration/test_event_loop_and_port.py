"""Serve process options: the event loop (uvloop by default, --no-uvloop for asyncio's) and
SO_REUSEPORT (off by default: a busy port is an error; on: several processes share a port)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
EXIT_STARTUP_FAILED = 1


class _Server:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.address = ""

    @classmethod
    async def start(cls, *flags: str) -> _Server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tokenrelay_server.main", "--engine", "synthetic", "--host", "127.0.0.1",
            "--no-warmup", *flags, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def listening(self) -> str:
        line = (await asyncio.wait_for(self.proc.stdout.readline(), timeout=60)).decode().strip()
        assert line.startswith("tokenrelay listening on "), line
        self.address = line.removeprefix("tokenrelay listening on ")
        return self.address

    async def stop(self) -> str:
        """SIGTERM, wait, return its stderr."""
        if self.proc.returncode is None:
            self.proc.terminate()
        _, err = await asyncio.wait_for(self.proc.communicate(), timeout=60)
        return err.decode()


async def _serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_uvloop_by_default_and_asyncio_when_turned_off():
    default = await _Server.start("--port", "0")
    plain = await _Server.start("--port", "0", "--no-uvloop")
    try:
        assert await _serving(await default.listening())
        assert await _serving(await plain.listening())
    finally:
        default_log, plain_log = await default.stop(), await plain.stop()
    assert "event loop: uvloop" in default_log
    assert "event loop: asyncio" in plain_log and "uvloop" not in plain_log


async def test_a_busy_port_is_an_error_unless_so_reuseport_is_on():
    first = await _Server.start("--port", "0")
    try:
        port = (await first.listening()).rsplit(":", 1)[1]
        second = await _Server.start("--port", port)
        assert await asyncio.wait_for(second.proc.wait(), timeout=60) == EXIT_STARTUP_FAILED
        await second.stop()
    finally:
        await first.stop()

    shared = [await _Server.start("--port", "0", "--so-reuseport")]
    try:
        port = (await shared[0].listening()).rsplit(":", 1)[1]
        shared.append(await _Server.start("--port", port, "--so-reuseport"))
        assert await shared[1].listening() == f"127.0.0.1:{port}"
        assert await _serving(f"127.0.0.1:{port}")
        await shared[0].stop()  # the port keeps answering from the other process
        assert await _serving(f"127.0.0.1:{port}")
    finally:
        for server in shared:
            await server.stop()
