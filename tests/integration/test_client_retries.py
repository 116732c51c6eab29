"""The client's retries against real servers: a full queue (RESOURCE_EXHAUSTED with RetryInfo)
is retried after the hinted delay; a SubmitJob whose server is SIGKILLed after storing the job,
before its reply, is retried into the same job, never a second one.

The SIGKILL test runs `python -m tokenrelay_server.main` processes on one SQLite file, reached
through a small TCP relay in the test (real bytes, real sockets) that can withhold the server's
replies: that is how the reply to the stored SubmitJob is lost, as in the field when a server
dies between its commit and its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.jobs.procs import spawn_replica
from tokenrelay import AsyncClient, FinishReason, JobState
from tokenrelay_server.telemetry.config import TelemetryConfig

CALL_BOUND = 30.0


def _rejected(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "tokenrelay:num_requests_rejected_total")


@pytest.mark.parametrize("hint_ms", [1000])
async def test_full_queue_is_retried_after_the_hinted_delay(synthetic_server_factory, wait_until, hint_ms):
    server = await synthetic_server_factory(
        ttft_ms=20_000.0, warmup=False, max_pending_requests=1, retry_after_ms=hint_ms,
        telemetry=TelemetryConfig(metrics_port=0))
    metrics_port = server.handle.telemetry.metrics_port
    async with AsyncClient(server.address, timeout=CALL_BOUND, max_retries=0) as holder_client, \
            AsyncClient(server.address, timeout=CALL_BOUND) as client:
        holder = holder_client.stream("hold the only slot", max_tokens=2)
        holder_events = holder.__aiter__()
        started = asyncio.ensure_future(holder_events.__anext__())  # admitted; its first token is 20 s away
        await wait_until(lambda: server.engine.stats().running + server.engine.stats().waiting == 1,
                         timeout=CALL_BOUND)
        t0 = time.monotonic()
        call = asyncio.ensure_future(client.generate("after the holder", max_tokens=2, ignore_eos=True))
        rejected = 0.0

        async def refused_once() -> bool:
            nonlocal rejected
            rejected = await asyncio.to_thread(_rejected, metrics_port)
            return rejected >= 1

        deadline = time.monotonic() + CALL_BOUND
        while not await refused_once():  # bounded: the first attempt is refused at once
            assert time.monotonic() < deadline and not call.done(), "the first attempt was not refused"
            await asyncio.sleep(0.01)
        started.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await started
        await holder.aclose()  # frees the slot; the client is waiting out the server's hint
        result = await asyncio.wait_for(call, CALL_BOUND)
        elapsed = time.monotonic() - t0
    assert result.finish_reason is FinishReason.LENGTH and len(result.token_ids) == 2
    assert elapsed >= hint_ms / 1000, elapsed  # the retry came after the RetryInfo delay
    assert 1 <= await asyncio.to_thread(_rejected, metrics_port) <= 2  # refused, then served


class Relay:
    """A TCP relay 127.0.0.1:PORT -> upstream that can withhold replies and drop its clients."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.hold_replies = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, replies: bool) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(65536):
                if replies and self.hold_replies:
                    continue  # the reply is lost on the way
                writer.write(chunk)
                await writer.drain()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        host, port = self.upstream.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        self._writers += [client_writer, up_writer]
        for task in (asyncio.ensure_future(self._pump(client_reader, up_writer, replies=False)),
                     asyncio.ensure_future(self._pump(up_reader, client_writer, replies=True))):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def drop_connections(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.drop_connections()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def _stored_jobs(db: Path) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        return conn.execute("SELECT job_id, idem_key FROM jobs").fetchall()


@pytest.mark.slow
async def test_submit_killed_after_the_store_is_retried_into_the_same_job(tmp_path):
    db = tmp_path / "jobs.sqlite"
    store = f"sqlite://{db}"
    first = await spawn_replica(store, tmp_path / "a", "--replica-id", "a")
    relay = Relay(first.address)
    await relay.start()
    second = None
    try:
        async with AsyncClient(f"127.0.0.1:{relay.port}", timeout=60) as client:
            assert (await client.list_jobs()).jobs == ()  # connected through the relay
            relay.hold_replies = True
            submit = asyncio.ensure_future(client.submit("survive the kill", max_tokens=4))
            deadline = time.monotonic() + CALL_BOUND
            while not (stored := await asyncio.to_thread(_stored_jobs, db)):  # bounded poll of the file
                assert time.monotonic() < deadline and not submit.done(), "the job was never stored"
                await asyncio.sleep(0.01)
            await first.kill()  # SIGKILL: stored, but the reply never reached the client
            assert not submit.done()
            second = await spawn_replica(store, tmp_path / "b", "--replica-id", "a")
            relay.upstream, relay.hold_replies = second.address, False
            relay.drop_connections()  # the client sees UNAVAILABLE and retries
            submitted = await asyncio.wait_for(submit, 60)
            assert [job_id for job_id, _ in stored] == [submitted.job.job_id]
            assert not submitted.created  # found by the idempotency key the client made up
            assert stored[0][1].endswith(submitted.job.idempotency_key)
            listed = await client.list_jobs()
            assert [job.job_id for job in listed.jobs] == [submitted.job.job_id]
            done = await client.wait(submitted.job.job_id, timeout=60)
            assert done.state is JobState.SUCCEEDED and len(done.result.token_ids) == 4
        assert len(_stored_jobs(db)) == 1  # no duplicate
    finally:
        await relay.close()
        for replica in (first, second):
            if replica is not None:
                await replica.close()
