"""Every typed option of the client reaches a real server: one round trip per option and method.

The server is the real one (gRPC, conversion, validation, admission, jobs on SQLite) around a
synthetic engine that keeps each `Request` it is handed, so the test reads the value the
server decoded; where the synthetic engine shows an option's effect in the response (length,
seed, request id, stops, eos, logprobs) that is checked too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tokenrelay import AsyncClient, Client, FinishReason, JobState
from tokenrelay._params import GENERATION_OPTIONS
from tokenrelay_engines.base import ModelInfo, Request, RequestOutput
from tokenrelay_engines.synthetic import SyntheticEngine, SyntheticEngineConfig

from tests.integration.conftest import TEST_SYNTHETIC

CALL_BOUND = 30.0
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
MESSAGES = [{"role": "user", "content": "hello relay"}]


class RecordingEngine(SyntheticEngine):
    """The synthetic engine, with a chat template, keeping every request the server hands it."""

    def __init__(self, config: SyntheticEngineConfig) -> None:
        super().__init__(config)
        self.requests: list[Request] = []

    def info(self) -> ModelInfo:
        return dataclasses.replace(super().info(), chat_template=TEMPLATE)

    def add_request(self, request: Request) -> AsyncIterator[RequestOutput]:
        self.requests.append(request)
        return super().add_request(request)


# option -> (value sent, what the engine must have received)
OPTIONS: dict[str, tuple[Any, Callable[[Request], Any], Any]] = {
    "max_tokens": (5, lambda r: r.stopping.max_tokens, 5),
    "min_tokens": (3, lambda r: r.stopping.min_tokens, 3),
    "temperature": (0.5, lambda r: r.sampling.temperature, 0.5),
    "top_p": (0.75, lambda r: r.sampling.top_p, 0.75),
    "top_k": (7, lambda r: r.sampling.top_k, 7),
    "min_p": (0.25, lambda r: r.sampling.min_p, 0.25),
    "repetition_penalty": (1.25, lambda r: r.sampling.repetition_penalty, 1.25),
    "presence_penalty": (0.5, lambda r: r.sampling.presence_penalty, 0.5),
    "frequency_penalty": (-0.5, lambda r: r.sampling.frequency_penalty, -0.5),
    "seed": (2**40 + 7, lambda r: r.sampling.seed, 2**40 + 7),
    "stop": ("zzz", lambda r: r.stopping.stop, ("zzz",)),
    "stop_token_ids": ([3, 5], lambda r: r.stopping.stop_token_ids, (3, 5)),
    "ignore_eos": (True, lambda r: r.stopping.ignore_eos, True),
    "include_stop_in_output": (True, lambda r: r.stopping.include_stop_in_output, True),
    "logprobs": (2, lambda r: r.sampling.logprobs, 2),
    "priority": (-5, lambda r: r.priority, -5),
    # the server keeps the caller's id as the prefix of the engine's unique one
    "request_id": ("rt-opt-1", lambda r: r.request_id.partition("#")[0], "rt-opt-1"),
}
METHODS = ("generate", "stream", "chat", "chat_stream", "submit")


def test_the_table_covers_every_option_of_every_method():
    assert set(OPTIONS) == GENERATION_OPTIONS
    for cls in (Client, AsyncClient):
        for method in METHODS:
            params = inspect.signature(getattr(cls, method)).parameters
            missing = GENERATION_OPTIONS - set(params)
            assert not missing, f"{cls.__name__}.{method} lacks {sorted(missing)}"
            assert all(params[name].kind is inspect.Parameter.KEYWORD_ONLY for name in GENERATION_OPTIONS)
            assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@pytest.fixture
async def recording(synthetic_server_factory) -> RecordingEngine:
    engine = RecordingEngine(SyntheticEngineConfig(**TEST_SYNTHETIC))
    server = await synthetic_server_factory(engine=engine)
    engine.address = server.address  # type: ignore[attr-defined]
    return engine


async def _call(client: AsyncClient, method: str, options: dict[str, Any]) -> Any:
    """One call of `method`; returns what the server answered (a result, or the ended job)."""
    if method == "generate":
        return await client.generate("hello relay", **options)
    if method == "chat":
        return await client.chat(MESSAGES, **options)
    if method in ("stream", "chat_stream"):
        stream = client.stream("hello relay", **options) if method == "stream" else \
            client.chat_stream(MESSAGES, **options)
        return await stream.result()
    submitted = await client.submit("hello relay", **options)
    return await client.wait(submitted.job.job_id, timeout=CALL_BOUND)


@pytest.mark.parametrize("option", sorted(OPTIONS))
async def test_option_reaches_the_server(recording, option):
    value, received, expected = OPTIONS[option]
    async with AsyncClient(recording.address, timeout=CALL_BOUND) as client:
        for method in METHODS:
            recording.requests.clear()
            answer = await _call(client, method, {option: value})
            assert recording.requests, method
            request = recording.requests[-1]
            if option in ("request_id", "priority") and method == "submit":
                # A job's attempts run under the job's own id and tier; the server stored the values.
                assert getattr(answer.proto.params, option) == value
                continue
            assert received(request) == expected, (method, received(request))
            if method == "submit":
                assert answer.state is JobState.SUCCEEDED, answer
                answer = answer.result
            if option == "max_tokens":
                assert len(answer.token_ids) == 5 and answer.finish_reason is FinishReason.LENGTH
            elif option == "seed":
                assert answer.seed == value
            elif option == "request_id":
                assert answer.request_id == value
            elif option == "logprobs":
                assert len(answer.logprobs) == len(answer.token_ids)
                assert all(len(lp.top) == 2 for lp in answer.logprobs)


async def test_stopping_options_take_effect(synthetic_server_factory):
    server = await synthetic_server_factory(eos_rate=1.0)  # every token would be </s>
    async with AsyncClient(server.address, timeout=CALL_BOUND) as client:
        assert (await client.generate("x", max_tokens=8)).finish_reason is FinishReason.EOS
        held = await client.generate("x", max_tokens=8, min_tokens=3)
        assert held.finish_reason is FinishReason.EOS and held.usage.completion_tokens == 3
        ignored = await client.generate("x", max_tokens=6, ignore_eos=True)
        assert ignored.finish_reason is FinishReason.LENGTH and len(ignored.token_ids) == 6
        free = await client.generate("x", max_tokens=8, ignore_eos=True, seed=1)
        tid = free.token_ids[2]
        cut_at = free.token_ids.index(tid)
        by_id = await client.generate("x", max_tokens=8, ignore_eos=True, seed=1, stop_token_ids=[tid])
        assert by_id.finish_reason is FinishReason.STOP and by_id.matched_stop == tid
        assert by_id.token_ids == free.token_ids[:cut_at + 1]  # ids end at the stop token ...
        kept = await client.generate("x", max_tokens=8, ignore_eos=True, seed=1, stop_token_ids=[tid],
                                     include_stop_in_output=True)
        assert kept.token_ids == by_id.token_ids  # ... whose text only include_stop_in_output keeps
        assert free.text.startswith(kept.text) and kept.text.startswith(by_id.text)
        assert len(kept.text) > len(by_id.text)
    server = await synthetic_server_factory()
    async with AsyncClient(server.address, timeout=CALL_BOUND) as client:
        free = await client.generate("x", max_tokens=12, seed=1)
        word = free.text.split()[2]
        cut = await client.generate("x", max_tokens=12, seed=1, stop=word)
        assert cut.finish_reason is FinishReason.STOP and cut.matched_stop == word
        assert word not in cut.text and free.text.startswith(cut.text)
        greedy = [await client.generate("x", max_tokens=6, temperature=0, seed=s) for s in (1, 2)]
        assert greedy[0].token_ids == greedy[1].token_ids  # temperature 0: the seed does not matter


async def test_the_blocking_client_sends_every_option(recording):
    options = {name: value for name, (value, _, _) in OPTIONS.items()}

    def calls() -> None:  # a blocking client, off the event loop that serves the server
        with Client(recording.address, timeout=CALL_BOUND) as client:
            for method in ("generate", "stream", "chat", "chat_stream"):
                recording.requests.clear()
                prompt: Any = MESSAGES if method.startswith("chat") else "hello relay"
                result = getattr(client, method)(prompt, **options)
                if method.endswith("stream"):
                    result = result.result()
                request = recording.requests[-1]
                for name, (_, received, expected) in OPTIONS.items():
                    assert received(request) == expected, (method, name)
                assert result.request_id == "rt-opt-1" and result.seed == 2**40 + 7
            recording.requests.clear()
            job = client.wait(client.submit("hello relay", **options).job.job_id, timeout=CALL_BOUND)
            assert job.proto.params.request_id == "rt-opt-1" and job.proto.params.priority == -5
            request = recording.requests[-1]
            for name, (_, received, expected) in OPTIONS.items():
                if name not in ("request_id", "priority"):
                    assert received(request) == expected, ("submit", name)

    await asyncio.wait_for(asyncio.to_thread(calls), CALL_BOUND * 2)
