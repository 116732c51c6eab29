"""Client against small real grpc.aio servers (the generated servicer base classes): retries
counted per attempt, jobs calls and waiting, typed results. Runs without the server package."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import json_format, timestamp_pb2

from tests.client.conftest import CALL_BOUND, in_thread
from tokenrelay import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    FinishReason,
    JobPriority,
    JobState,
    NotFoundError,
    ResourceExhaustedError,
    TokenRelayError,
    UnavailableError,
    UnimplementedError,
)
from tokenrelay._status import RetryInfo, encode_status
from tokenrelay.v1 import (
    generation_pb2,
    jobs_pb2,
    jobs_pb2_grpc,
    text_generation_pb2,
    text_generation_pb2_grpc,
)


# -- retries, counted on a tiny server -----------------------------------------------------

class FlakyTextGeneration(text_generation_pb2_grpc.TextGenerationServiceServicer):
    """Fails the first `failures` calls of each RPC with `code`; streams can fail mid-way."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
                 fail_after_first_event: bool = False, retry_delay: float | None = 0.01) -> None:
        self.failures = failures
        self.code = code
        self.fail_after_first_event = fail_after_first_event
        self.retry_delay = retry_delay
        self.attempts = {"Generate": 0, "GenerateStream": 0}
        self.times: list[float] = []  # loop.time() of each attempt

    async def _maybe_fail(self, name: str, context) -> None:
        self.attempts[name] += 1
        self.times.append(asyncio.get_running_loop().time())
        if self.attempts[name] <= self.failures:
            hint = [RetryInfo(self.retry_delay)] if self.retry_delay is not None else []
            details = encode_status(self.code.value[0], "try later", hint)
            await context.abort(self.code, "try later",
                                trailing_metadata=(("grpc-status-details-bin", details),))

    async def Generate(self, request, context):
        await self._maybe_fail("Generate", context)
        return text_generation_pb2.GenerateResponse(
            result=generation_pb2.GenerationResult(text="ok", token_ids=[1]))

    async def GenerateStream(self, request, context):
        if not self.fail_after_first_event:
            await self._maybe_fail("GenerateStream", context)
        yield text_generation_pb2.GenerateStreamResponse(
            started=text_generation_pb2.StreamStarted(request_id="s"))
        if self.fail_after_first_event:
            await self._maybe_fail("GenerateStream", context)
        yield text_generation_pb2.GenerateStreamResponse(
            delta=text_generation_pb2.StreamDelta(text="ok", token_ids=[1]))
        yield text_generation_pb2.GenerateStreamResponse(
            finished=text_generation_pb2.StreamFinished(finish_reason=generation_pb2.FINISH_REASON_LENGTH))


async def test_unavailable_is_retried_until_success(tiny_server):
    servicer = FlakyTextGeneration(failures=2)
    address = await tiny_server(servicer)
    async with AsyncClient(address, timeout=CALL_BOUND, max_retries=3) as client:
        assert (await client.generate("x")).text == "ok"
        assert servicer.attempts["Generate"] == 3
        assert await client.stream("x").result() is not None
        assert servicer.attempts["GenerateStream"] == 3
    servicer.attempts = {"Generate": 0, "GenerateStream": 0}
    client = Client(address, timeout=CALL_BOUND, max_retries=3)
    try:
        assert (await in_thread(client.generate, "x")).text == "ok"
        assert servicer.attempts["Generate"] == 3
        assert (await in_thread(lambda: client.stream("x").result())).text == "ok"
        assert servicer.attempts["GenerateStream"] == 3
    finally:
        client.close()


async def test_retry_budget_is_bounded(tiny_server):
    servicer = FlakyTextGeneration(failures=100)
    address = await tiny_server(servicer)
    async with AsyncClient(address, timeout=CALL_BOUND, max_retries=2) as client:
        with pytest.raises(UnavailableError) as caught:
            await client.generate("x")
    assert servicer.attempts["Generate"] == 3  # 1 + 2 retries
    assert caught.value.retry_delay == pytest.approx(0.01)


@pytest.mark.parametrize("code", [grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT,
                                  grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.NOT_FOUND])
async def test_other_codes_are_not_retried(tiny_server, code):
    servicer = FlakyTextGeneration(failures=1, code=code)
    address = await tiny_server(servicer)
    async with AsyncClient(address, timeout=CALL_BOUND, max_retries=3) as client:
        with pytest.raises(TokenRelayError) as caught:
            await client.generate("x")
        assert caught.value.code == code
        with pytest.raises(TokenRelayError):
            await client.stream("x").result()
    assert servicer.attempts == {"Generate": 1, "GenerateStream": 1}


async def test_stream_is_not_retried_after_its_first_event(tiny_server):
    servicer = FlakyTextGeneration(failures=1, fail_after_first_event=True)
    address = await tiny_server(servicer)
    async with AsyncClient(address, timeout=CALL_BOUND, max_retries=3) as client:
        stream = client.stream("x")
        with pytest.raises(UnavailableError):
            async for _ in stream:
                pass
        assert stream.started.request_id == "s"  # the event before the failure was delivered once
    assert servicer.attempts["GenerateStream"] == 1


# -- jobs ----------------------------------------------------------------------------------

def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


class InMemoryJobs(jobs_pb2_grpc.JobsServiceServicer):
    """A stand-in Jobs service: a job ends SUCCEEDED the first time it is watched."""

    def __init__(self) -> None:
        self.jobs: dict[str, jobs_pb2.Job] = {}
        self.keys: dict[str, str] = {}
        self.watch_offsets: list[int] = []

    async def _find(self, job_id: str, context) -> jobs_pb2.Job:
        if job_id not in self.jobs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no job {job_id!r}")
        return self.jobs[job_id]

    async def SubmitJob(self, request, context):
        if request.idempotency_key in self.keys:
            return jobs_pb2.SubmitJobResponse(job=self.jobs[self.keys[request.idempotency_key]], created=False)
        job_id = f"job-{len(self.jobs) + 1}"
        job = jobs_pb2.Job(job_id=job_id, state=jobs_pb2.JOB_STATE_QUEUED, priority=request.priority,
                           params=request.params, create_time=_now(), idempotency_key=request.idempotency_key,
                           max_tokens=request.params.stopping.max_tokens, labels=request.labels)
        self.jobs[job_id] = job
        self.keys[request.idempotency_key] = job_id
        return jobs_pb2.SubmitJobResponse(job=job, created=True)

    async def GetJob(self, request, context):
        return jobs_pb2.GetJobResponse(job=await self._find(request.job_id, context))

    async def WatchJob(self, request, context):
        job = await self._find(request.job_id, context)
        self.watch_offsets.append(request.from_token_offset)
        yield jobs_pb2.WatchJobResponse(state_change=jobs_pb2.JobStateChange(state=jobs_pb2.JOB_STATE_RUNNING))
        yield jobs_pb2.WatchJobResponse(delta=jobs_pb2.JobDelta(token_offset=0, token_ids=[7], text=" done"))
        job.state = jobs_pb2.JOB_STATE_SUCCEEDED
        job.completion_tokens = 1
        job.result.text = " done"
        yield jobs_pb2.WatchJobResponse(ended=job)

    async def CancelJob(self, request, context):
        job = await self._find(request.job_id, context)
        job.state = jobs_pb2.JOB_STATE_CANCELLED
        return jobs_pb2.CancelJobResponse(job=job)

    async def ListJobs(self, request, context):
        jobs = [j for j in self.jobs.values() if not request.states or j.state in request.states]
        return jobs_pb2.ListJobsResponse(jobs=jobs[: request.page_size or 100])

    async def DeleteJob(self, request, context):
        await self._find(request.job_id, context)
        del self.jobs[request.job_id]
        return jobs_pb2.DeleteJobResponse()


class PollOnlyJobs(InMemoryJobs):
    """No WatchJob (UNIMPLEMENTED): the job succeeds on its third GetJob."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = 0

    async def GetJob(self, request, context):
        self.gets += 1
        job = await self._find(request.job_id, context)
        if self.gets >= 3:
            job.state = jobs_pb2.JOB_STATE_SUCCEEDED
        return jobs_pb2.GetJobResponse(job=job)

    WatchJob = jobs_pb2_grpc.JobsServiceServicer.WatchJob


async def test_job_calls(tiny_server):
    servicer = InMemoryJobs()
    address = await tiny_server(jobs=servicer)
    async with AsyncClient(address, timeout=CALL_BOUND) as client:
        submitted = await client.submit("hello", max_tokens=4, job_priority="urgent",
                                        idempotency_key="k1", labels={"team": "a"})
        assert submitted.created and submitted.job.state == JobState.QUEUED
        job_id = submitted.job.job_id
        assert submitted.job.priority == JobPriority.URGENT
        again = await client.submit("hello", max_tokens=4, idempotency_key="k1")
        assert not again.created and again.job.job_id == job_id
        auto = await client.submit("other")
        assert auto.created and auto.job.idempotency_key  # the client made a key up
        assert (await client.get(job_id)).proto.params.text == "hello"
        listed = await client.list_jobs(["queued"])
        assert {j.job_id for j in listed.jobs} == {job_id, auto.job.job_id}

        events = [e.kind async for e in client.watch(job_id, from_token_offset=0)]
        assert events == ["state_change", "delta", "ended"]
        assert (await client.get(job_id)).state == JobState.SUCCEEDED

        finished = await client.wait(auto.job.job_id, timeout=CALL_BOUND)
        assert finished.state == JobState.SUCCEEDED and finished.result.text == " done"
        cancelled = await client.cancel(job_id)
        assert cancelled.state == JobState.CANCELLED
        await client.delete(job_id)
        with pytest.raises(NotFoundError):
            await client.get(job_id)

    client = Client(address, timeout=CALL_BOUND)
    try:
        job_id = (await in_thread(client.submit, "sync", max_tokens=2)).job.job_id
        assert (await in_thread(client.wait, job_id, CALL_BOUND)).state == JobState.SUCCEEDED
        assert (await in_thread(client.get, job_id)).completion_tokens == 1
        assert [j.job_id for j in (await in_thread(client.list_jobs, ["succeeded"])).jobs] == [
            j for j in servicer.jobs if servicer.jobs[j].state == jobs_pb2.JOB_STATE_SUCCEEDED]
        await in_thread(client.cancel, job_id)
        await in_thread(client.delete, job_id)
        with pytest.raises(NotFoundError):
            await in_thread(client.delete, job_id)
    finally:
        client.close()


async def test_wait_polls_when_watch_is_unimplemented(tiny_server):
    servicer = PollOnlyJobs()
    address = await tiny_server(jobs=servicer)
    async with AsyncClient(address, timeout=CALL_BOUND) as client:
        job_id = (await client.submit("x")).job.job_id
        with pytest.raises(UnimplementedError):
            async for _ in client.watch(job_id):
                pass
        job = await client.wait(job_id, timeout=CALL_BOUND, poll_interval=0.01)
        assert job.state == JobState.SUCCEEDED and servicer.gets >= 3


async def test_wait_times_out(tiny_server):
    class NeverEnds(PollOnlyJobs):
        async def GetJob(self, request, context):
            return jobs_pb2.GetJobResponse(job=await self._find(request.job_id, context))

    address = await tiny_server(jobs=NeverEnds())
    async with AsyncClient(address, timeout=CALL_BOUND) as client:
        job_id = (await client.submit("x")).job.job_id
        with pytest.raises(DeadlineExceededError, match="did not end"):
            await client.wait(job_id, timeout=0.3, poll_interval=0.05)




# -- retry rules added with the typed client -----------------------------------------------

async def test_resource_exhausted_with_retry_info_is_retried_after_the_hint(tiny_server):
    servicer = FlakyTextGeneration(failures=1, code=grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay=0.3)
    address = await tiny_server(servicer)
    async with AsyncClient(address, timeout=CALL_BOUND) as client:
        result = await client.generate("x")
    assert result.text == "ok" and servicer.attempts["Generate"] == 2
    waited = servicer.times[1] - servicer.times[0]
    assert waited >= 0.3, waited  # at least the server's RetryInfo delay
    assert waited < 0.3 * 1.25 + 1.0, waited  # jittered up by at most 25 % (+ scheduling slack)


async def test_resource_exhausted_without_a_hint_is_not_retried(tiny_server):
    servicer = FlakyTextGeneration(failures=1, code=grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay=None)
    address = await tiny_server(servicer)
    async with AsyncClient(address, timeout=CALL_BOUND) as client:
        with pytest.raises(ResourceExhaustedError) as caught:
            await client.generate("x")
    assert caught.value.retry_delay is None and servicer.attempts["Generate"] == 1


async def test_default_budget_is_two_retries(tiny_server, monkeypatch):
    monkeypatch.delenv("TOKENRELAY_MAX_RETRIES", raising=False)
    servicer = FlakyTextGeneration(failures=100)
    address = await tiny_server(servicer)
    async with AsyncClient(address, timeout=CALL_BOUND) as client:
        assert client.max_retries == 2
        with pytest.raises(UnavailableError):
            await client.generate("x")
    assert servicer.attempts["Generate"] == 3
    servicer.attempts["Generate"] = 0
    with Client(address, timeout=CALL_BOUND) as sync_client:
        with pytest.raises(UnavailableError):
            await in_thread(sync_client.generate, "x")
    assert servicer.attempts["Generate"] == 3


class LostReplyJobs(InMemoryJobs):
    """Stores (or deletes) on the first attempt, then fails it UNAVAILABLE as if the reply was lost."""

    def __init__(self) -> None:
        super().__init__()
        self.submit_keys: list[str] = []
        self.delete_attempts = 0

    async def SubmitJob(self, request, context):
        self.submit_keys.append(request.idempotency_key)
        response = await super().SubmitJob(request, context)
        if len(self.submit_keys) == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost after the store")
        return response

    async def DeleteJob(self, request, context):
        self.delete_attempts += 1
        response = await super().DeleteJob(request, context)
        if self.delete_attempts == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost after the delete")
        return response


@pytest.mark.parametrize("blocking", [False, True])
async def test_submit_retry_reuses_its_idempotency_key_and_delete_retry_is_done(tiny_server, blocking):
    servicer = LostReplyJobs()
    address = await tiny_server(jobs=servicer)
    if blocking:
        client = Client(address, timeout=CALL_BOUND)
        submitted = await in_thread(client.submit, "x", max_tokens=2)
        await in_thread(client.delete, submitted.job.job_id)
        client.close()
    else:
        async with AsyncClient(address, timeout=CALL_BOUND) as aclient:
            submitted = await aclient.submit("x", max_tokens=2)
            await aclient.delete(submitted.job.job_id)
    # Two attempts, one made-up key, one job: the retry found the job the first attempt stored.
    assert len(servicer.submit_keys) == 2 and len(set(servicer.submit_keys)) == 1
    assert servicer.submit_keys[0] and not submitted.created
    assert submitted.job.idempotency_key == servicer.submit_keys[0]
    # The delete's retry met NOT_FOUND (the first attempt had deleted it): done, not an error.
    assert servicer.delete_attempts == 2 and servicer.jobs == {}


async def test_delete_of_an_unknown_job_is_still_not_found(tiny_server):
    address = await tiny_server(jobs=InMemoryJobs())
    async with AsyncClient(address, timeout=CALL_BOUND) as client:
        with pytest.raises(NotFoundError):
            await client.delete("job-404")


async def test_results_are_typed(tiny_server):
    address = await tiny_server(FlakyTextGeneration(failures=0), InMemoryJobs())
    async with AsyncClient(address, timeout=CALL_BOUND) as client:
        result = await client.generate("x")
        assert result.token_ids == (1,) and result.finish_reason is FinishReason.UNSPECIFIED
        stream = client.stream("x")
        deltas = [d async for d in stream]
        assert stream.finish_reason is FinishReason.LENGTH and str(stream.finish_reason) == "length"
        assert [d.text for d in deltas] == ["ok"] and stream.started.request_id == "s"
        job = (await client.submit("x", job_priority=JobPriority.BULK)).job
        assert job.priority is JobPriority.BULK and job.state is JobState.QUEUED
        assert not job.ended and job.create_time is not None and job.create_time.tzinfo is not None
        ended = await client.wait(job.job_id, timeout=CALL_BOUND)
        assert ended.state is JobState.SUCCEEDED and ended.ended and str(ended.state) == "succeeded"
        assert f"{ended.state}" == "succeeded" and repr(ended.state) == "<JobState.SUCCEEDED: 3>"
        assert str(result.usage) == "0 prompt + 0 completion tokens" and "\n" not in repr(result)
        # Code written against the former protobuf results keeps working at run time.
        assert json_format.MessageToDict(result)["text"] == "ok" and result.proto.text == "ok"
        assert ended.HasField("result") and ended.proto.job_id == ended.job_id
        assert ended.state == jobs_pb2.JOB_STATE_SUCCEEDED  # the enums keep the wire values
