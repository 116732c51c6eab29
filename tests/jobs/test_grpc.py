"""The Jobs API over a real grpc.aio server on an ephemeral port (synthetic engine, SQLite)."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tokenrelay.v1 import generation_pb2, jobs_pb2, jobs_pb2_grpc

from tokenrelay_server.jobs.webhooks import WebhookConfig

from tests.jobs.conftest import SECRET
from tests.jobs.helpers import FlakyEngine, started_synthetic, submit_request, wait_job

async def wait_ended(stub: jobs_pb2_grpc.JobsServiceStub, job_id: str, timeout: float = 20.0) -> jobs_pb2.Job:
    """Watch until the job ends (a bounded wait on the API's own event stream)."""
    async def run() -> jobs_pb2.Job:
        async for ev in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id)):
            if ev.HasField("ended"):
                return ev.ended
        raise AssertionError("watch closed without an ended event")
    return await asyncio.wait_for(run(), timeout)


def details(err: grpc.aio.AioRpcError) -> list:
    status = rpc_status.from_call(err)
    assert status is not None
    out = []
    for any_ in status.details:
        for kind in (error_details_pb2.BadRequest, error_details_pb2.ErrorInfo):
            if any_.Is(kind.DESCRIPTOR):
                msg = kind()
                any_.Unpack(msg)
                out.append(msg)
    return out


async def test_submit_get_watch_to_success(jobs_server) -> None:
    srv = await jobs_server()
    resp = await srv.stub.SubmitJob(submit_request(10, labels={"team": "search"}))
    assert resp.created and resp.job.job_id.startswith("job_") and len(resp.job.job_id) >= 36
    assert resp.job.state in (jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING)
    assert resp.job.seed != 0 and resp.job.params.sampling.HasField("seed")
    ended = await wait_ended(srv.stub, resp.job.job_id)
    assert ended.state == jobs_pb2.JOB_STATE_SUCCEEDED
    got = (await srv.stub.GetJob(jobs_pb2.GetJobRequest(job_id=resp.job.job_id))).job
    assert got.completion_tokens == 10 == got.max_tokens == len(got.result.token_ids)
    assert got.result.finish_reason == generation_pb2.FINISH_REASON_LENGTH and got.result.text
    assert got.result.seed == got.seed and got.labels == {"team": "search"}
    assert [h.state for h in got.history] == [jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING,
                                              jobs_pb2.JOB_STATE_SUCCEEDED]
    assert got.expire_time.seconds > got.update_time.seconds  # deleted after the retention


async def test_idempotency_key(jobs_server) -> None:
    srv = await jobs_server()
    first = await srv.stub.SubmitJob(submit_request(4, idempotency_key="order-17"))
    again = await srv.stub.SubmitJob(submit_request(4, idempotency_key="order-17"))
    assert first.created and not again.created and again.job.job_id == first.job.job_id
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await srv.stub.SubmitJob(submit_request(5, idempotency_key="order-17"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    info = [d for d in details(err.value) if isinstance(d, error_details_pb2.ErrorInfo)]
    assert info and info[0].reason == "IDEMPOTENCY_KEY_REUSED" and info[0].metadata["job_id"] == first.job.job_id


async def test_bad_input_gets_clear_errors(jobs_server) -> None:
    srv = await jobs_server()
    bad = submit_request(4)
    bad.params.sampling.top_p = 2.0
    bad.max_attempts = 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await srv.stub.SubmitJob(bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {v.field for d in details(err.value) if isinstance(d, error_details_pb2.BadRequest)
              for v in d.field_violations}
    assert {"params.sampling.top_p", "max_attempts"} <= fields
    hooked = submit_request(4, webhook=jobs_pb2.Webhook(url="https://example.com/hook"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await srv.stub.SubmitJob(hooked)  # this server has no webhook secret
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for call, req in ((srv.stub.GetJob, jobs_pb2.GetJobRequest(job_id="job_nope")),
                      (srv.stub.CancelJob, jobs_pb2.CancelJobRequest(job_id="job_nope")),
                      (srv.stub.DeleteJob, jobs_pb2.DeleteJobRequest(job_id="job_nope"))):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(req)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in srv.stub.WatchJob(jobs_pb2.WatchJobRequest(job_id="job_nope")):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    job = (await srv.stub.SubmitJob(submit_request(4))).job
    for offset in (-1, 5):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in srv.stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id, from_token_offset=offset)):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await srv.stub.GetJob(jobs_pb2.GetJobRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for req in (jobs_pb2.ListJobsRequest(page_token="garbage"), jobs_pb2.ListJobsRequest(page_size=5000),
                jobs_pb2.ListJobsRequest(states=[42])):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await srv.stub.ListJobs(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cancel_keeps_partial_output_and_delete(jobs_server) -> None:
    srv = await jobs_server(engine=await started_synthetic(itl_ms=20.0))
    job = (await srv.stub.SubmitJob(submit_request(1000))).job

    async def some_tokens() -> None:
        async for ev in srv.stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id)):
            if ev.HasField("delta") and ev.delta.token_offset + len(ev.delta.token_ids) >= 3:
                return
    await asyncio.wait_for(some_tokens(), 20)
    cancelled = (await srv.stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id))).job
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
    assert len(cancelled.result.token_ids) >= 3
    assert cancelled.result.finish_reason == generation_pb2.FINISH_REASON_CANCELLED
    ended = await wait_ended(srv.stub, job.job_id)  # a watch on an ended job replays and closes
    assert ended.state == jobs_pb2.JOB_STATE_CANCELLED
    await srv.stub.DeleteJob(jobs_pb2.DeleteJobRequest(job_id=job.job_id))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await srv.stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_filters_by_state_and_pages(jobs_server) -> None:
    srv = await jobs_server(max_running=1)
    ids = [(await srv.stub.SubmitJob(submit_request(2))).job.job_id for _ in range(5)]
    for job_id in ids:
        await wait_ended(srv.stub, job_id)
    extra = (await srv.stub.SubmitJob(submit_request(2))).job.job_id
    await srv.stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=extra))  # may have ended already
    seen, token = [], ""
    while True:
        page = await srv.stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=2, page_token=token))
        assert len(page.jobs) <= 2
        seen += [j.job_id for j in page.jobs]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids + [extra]
    done = await srv.stub.ListJobs(jobs_pb2.ListJobsRequest(states=[jobs_pb2.JOB_STATE_SUCCEEDED]))
    assert set(ids) <= {j.job_id for j in done.jobs}


async def test_queue_ttl_expiry(jobs_server) -> None:
    srv = await jobs_server(engine=await started_synthetic(itl_ms=20.0), max_running=1)
    blocker = (await srv.stub.SubmitJob(submit_request(1000))).job
    req = submit_request(3)
    req.queue_ttl.FromMilliseconds(150)
    job = (await srv.stub.SubmitJob(req)).job
    ended = await wait_ended(srv.stub, job.job_id)
    assert ended.state == jobs_pb2.JOB_STATE_EXPIRED and ended.attempts == 0
    assert [h.state for h in ended.history] == [jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_EXPIRED]
    await srv.stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=blocker.job_id))


async def test_failing_job_goes_to_dead_letter(jobs_server) -> None:
    srv = await jobs_server(engine=FlakyEngine(await started_synthetic(), failures=10))
    req = submit_request(3, max_attempts=2)
    job = (await srv.stub.SubmitJob(req)).job
    ended = await wait_ended(srv.stub, job.job_id)
    assert ended.state == jobs_pb2.JOB_STATE_DEAD_LETTER and ended.attempts == 2
    assert "injected failure" in ended.last_error.message
    listed = await srv.stub.ListJobs(jobs_pb2.ListJobsRequest(states=[jobs_pb2.JOB_STATE_DEAD_LETTER]))
    assert [j.job_id for j in listed.jobs] == [job.job_id] and listed.jobs[0].last_error.message


async def watch_tokens(stub, job_id: str, offset: int, stop_after: int | None = None) -> tuple[list[int], bool]:
    ids: list[int] = []
    call = stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, from_token_offset=offset))
    async for ev in call:
        if ev.HasField("delta"):
            assert ev.delta.token_offset == offset + len(ids), "deltas must be contiguous"
            ids += ev.delta.token_ids
            if stop_after is not None and len(ids) >= stop_after:
                call.cancel()  # the client goes away mid-generation
                return ids, False
        elif ev.HasField("ended"):
            return ids, True
    raise AssertionError("watch closed without an ended event")


async def test_watch_cut_off_and_resumed_equals_uninterrupted(jobs_server) -> None:
    srv = await jobs_server(engine=await started_synthetic(itl_ms=5.0))
    job = (await srv.stub.SubmitJob(submit_request(100))).job
    whole = asyncio.create_task(watch_tokens(srv.stub, job.job_id, 0))
    first, ended = await asyncio.wait_for(watch_tokens(srv.stub, job.job_id, 0, stop_after=15), 20)
    assert not ended and len(first) < 100
    rest, ended = await asyncio.wait_for(watch_tokens(srv.stub, job.job_id, len(first)), 20)
    assert ended
    all_ids, _ = await asyncio.wait_for(whole, 20)
    got = (await srv.stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id))).job
    assert first + rest == all_ids == list(got.result.token_ids)


async def test_webhook_is_delivered_and_recorded(jobs_server) -> None:
    received: asyncio.Queue[tuple[dict[str, str], bytes]] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = await reader.readexactly(int(headers["content-length"]))
        await received.put((headers, body))
        writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    hook = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = hook.sockets[0].getsockname()[1]
    try:
        webhook = WebhookConfig(secret=SECRET, allow_private_hosts=("127.0.0.1",), allow_http=True,
                                max_attempts=2, backoff_seconds=(0.01,), timeout_seconds=5.0)
        srv = await jobs_server(webhook=webhook)
        job = (await srv.stub.SubmitJob(submit_request(3, webhook=jobs_pb2.Webhook(
            url=f"http://127.0.0.1:{port}/hook")))).job
        headers, body = await asyncio.wait_for(received.get(), 20)
        payload = json.loads(body)
        assert payload["job_id"] == job.job_id and payload["state"] == "succeeded"
        assert headers["webhook-id"] == f"{job.job_id}.succeeded"
        assert headers["webhook-signature"].startswith("v1,")

        await wait_job(srv.component.store, job.job_id, lambda j: bool(j.webhook_deliveries))
        got = (await srv.stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id))).job
        assert [(d.attempt, d.http_status) for d in got.webhook_deliveries] == [(1, 204)]
    finally:
        hook.close()
        await hook.wait_closed()
