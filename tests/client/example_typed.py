"""Code a backend writes against the public client API; tests/client/test_typing.py checks it
with `mypy --strict` (it is type-checked, not run)."""

from __future__ import annotations

import asyncio

from tokenrelay import (
    AsyncClient,
    Client,
    FinishReason,
    GenerationResult,
    InvalidArgumentError,
    Job,
    JobEvent,
    JobPriority,
    JobState,
    ModelInfo,
    ResourceExhaustedError,
    StreamDelta,
    SubmitResult,
    Timing,
    Usage,
)


def summarize(result: GenerationResult) -> str:
    usage: Usage = result.usage
    timing: Timing = result.timing
    first = timing.time_to_first_token
    reason: FinishReason = result.finish_reason
    return f"{reason}: {usage.completion_tokens} tokens, first after {first or 0.0:.3f} s"


def blocking() -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    with Client(timeout=30, max_retries=3) as client:
        result = client.generate("The capital of France is", max_tokens=8, temperature=0.0, top_p=0.9,
                                 top_k=40, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5,
                                 frequency_penalty=0.5, seed=1, stop=["."], stop_token_ids=[2],
                                 ignore_eos=False, include_stop_in_output=False, logprobs=2,
                                 priority=0, request_id="example-1", timeout=10.0,
                                 metadata=[("x-team", "search")])
        print(summarize(result), result.text, result.token_ids[:3], result.matched_stop)
        for logprob in result.logprobs:
            print(logprob.token_id, logprob.logprob, [top.token_id for top in logprob.top])
        if result.finish_reason is FinishReason.STOP:
            print("stopped")
        reply: GenerationResult = client.chat(question, max_tokens=32, temperature=0)
        print(reply.text)
        with client.chat_stream(question, max_tokens=32) as stream:
            for delta in stream:
                chunk: StreamDelta = delta
                print(chunk.text, end="")
        print(stream.finish_reason, stream.usage, stream.timing, stream.text)
        submitted: SubmitResult = client.submit(question, max_tokens=16, job_priority=JobPriority.BULK,
                                                labels={"team": "search"}, queue_ttl=60.0)
        job: Job = client.wait(submitted.job.job_id, timeout=60)
        if job.state is JobState.SUCCEEDED and job.result is not None:
            print(job.result.text, job.create_time)
        for event in client.watch(job.job_id):
            watched: JobEvent = event
            print(watched.kind, watched.state, watched.text)
        page = client.list_jobs([JobState.SUCCEEDED, "failed"], page_size=10)
        print([j.job_id for j in page.jobs], page.next_page_token)
        info: ModelInfo = client.info()
        print(info.model_name, info.context_length, client.load().running)
        ids: list[int] = client.tokenize("hello")
        print(client.detokenize(ids))
        try:
            client.generate("hi", top_p=3.0)
        except InvalidArgumentError as error:
            for field, description in error.field_violations:
                print(field, description)
        except ResourceExhaustedError as error:
            print(error.retry_delay)


async def concurrent() -> list[str]:
    async with AsyncClient("localhost:50051", api_key="key", timeout=None) as client:
        results = await asyncio.gather(*(client.generate(f"{i}+1=", max_tokens=4) for i in range(3)))
        stream = client.stream("Hello", max_tokens=8)
        async for delta in stream:
            print(delta.text, end="")
        folded: GenerationResult = await client.stream("Hello", max_tokens=8).result()
        job = await client.wait((await client.submit("x", max_tokens=4)).job.job_id, timeout=30)
        async for event in client.watch(job.job_id):
            print(event.kind)
        return [r.text for r in results] + [folded.text, str(job.state)]
