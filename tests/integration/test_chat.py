"""Chat messages through a real server (the demo adder model with a chat template file):
Generate, GenerateStream and SubmitJob, the client's chat()/chat_stream(), errors, and
`tokenrelay chat` driven through a pseudo-terminal."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest
from tokenrelay import AsyncClient, FailedPreconditionError, InvalidArgumentError
from tokenrelay.v1 import generation_pb2, jobs_pb2, jobs_pb2_grpc, text_generation_pb2, text_generation_pb2_grpc

from tokenrelay_engines.config import DEMO_MODEL, SchedulerConfig, TorchEngineConfig
from tests.engine_mode import engine_process  # noqa: E402
from tokenrelay_server.app import start_server
from tokenrelay_server.config import ServerConfig
from tokenrelay_server.jobs.model import JobsConfig

# The adder answers "A+B=" with the sum: the template asks it for (number of messages) + (last
# content), so each answer shows both the last message and how much conversation the server got.
# It also refuses a conversation that does not end with the user (raise_exception).
ADDER_TEMPLATE = (
    "{% if messages[-1]['role'] != 'user' %}{{ raise_exception('the last message must be from the user') }}"
    "{% endif %}{{ bos_token }}{{ messages | length }}+{{ messages[-1]['content'] }}=")
GREEDY = dict(temperature=0.0, max_tokens=6)


async def _serve(tmp_path: Path, template: str | None):
    template_file = ""
    if template is not None:
        path = tmp_path / "chat_template.jinja"
        path.write_text(template)
        template_file = str(path)
    torch_config = TorchEngineConfig(model=DEMO_MODEL, chat_template=template_file,
                                     scheduler=SchedulerConfig(max_num_seqs=16, num_blocks=256))
    config = ServerConfig(host="127.0.0.1", port=0, engine="torch", torch=torch_config, engine_process=engine_process(),
                          jobs=JobsConfig(store_url=f"sqlite://{tmp_path}/jobs.sqlite", poll_interval=0.05))
    return await asyncio.wait_for(start_server(config), timeout=120)


@pytest.fixture
async def chat_server(tmp_path: Path):
    handle = await _serve(tmp_path, ADDER_TEMPLATE)
    try:
        yield handle
    finally:
        await asyncio.wait_for(handle.stop(0), timeout=60)


def _messages(*pairs: tuple[str, str]) -> generation_pb2.ChatMessages:
    return generation_pb2.ChatMessages(messages=[generation_pb2.ChatMessage(role=r, content=c) for r, c in pairs])


async def test_generate_and_stream_with_chat_messages(chat_server) -> None:
    async with AsyncClient(chat_server.address, timeout=30) as client:
        one = await client.chat([{"role": "user", "content": "40"}], **GREEDY)
        assert one.text == "41" and one.finish_reason == generation_pb2.FINISH_REASON_EOS
        assert one.usage.prompt_tokens == len(await client.tokenize("<bos>1+40="))  # rendered, no BOS added twice
        conversation = [{"role": "system", "content": "add"}, {"role": "user", "content": "40"},
                        {"role": "assistant", "content": "41"}, {"role": "user", "content": "100"}]
        parts = []
        async with client.chat_stream(conversation, **GREEDY) as stream:
            async for delta in stream:
                parts.append(delta.text)
        assert "".join(parts) == "104" and stream.finish_reason == generation_pb2.FINISH_REASON_EOS
        as_pairs = await client.chat([("user", "7"), ("assistant", "8"), ("user", "7")], **GREEDY)
        assert as_pairs.text == "10"


async def test_submit_job_with_chat_messages(chat_server) -> None:
    async with grpc.aio.insecure_channel(chat_server.address) as channel:
        jobs = jobs_pb2_grpc.JobsServiceStub(channel)
        params = generation_pb2.GenerationParams(messages=_messages(("user", "250")),
                                                 sampling=generation_pb2.SamplingParams(temperature=0.0),
                                                 stopping=generation_pb2.StoppingCriteria(max_tokens=6))
        submitted = await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(params=params), timeout=30)
        async for event in jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=submitted.job.job_id), timeout=60):
            if event.WhichOneof("event") == "ended":
                break
        job = (await jobs.GetJob(jobs_pb2.GetJobRequest(job_id=submitted.job.job_id), timeout=30)).job
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED and job.result.text == "251"
        bad = generation_pb2.GenerationParams(messages=_messages(("robot", "1")))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await jobs.SubmitJob(jobs_pb2.SubmitJobRequest(params=bad), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_bad_chat_messages_are_invalid_argument(chat_server) -> None:
    async with AsyncClient(chat_server.address, timeout=30, retries=0) as client:
        with pytest.raises(InvalidArgumentError) as err:
            await client.chat([{"role": "robot", "content": "1"}], **GREEDY)
        assert [f for f, _ in err.value.field_violations] == ["params.messages.messages[0].role"]
        with pytest.raises(InvalidArgumentError) as err:  # the template's own raise_exception
            await client.chat([{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}], **GREEDY)
        assert "last message must be from the user" in err.value.field_violations[0][1]
        with pytest.raises(InvalidArgumentError) as err:
            await client.chat([{"role": "user", "content": "9" * (1 << 20)}, {"role": "user", "content": "1"}],
                              **GREEDY)
        assert "bytes of message content" in err.value.field_violations[0][1]
    async with grpc.aio.insecure_channel(chat_server.address) as channel:
        stub = text_generation_pb2_grpc.TextGenerationServiceStub(channel)
        empty = generation_pb2.GenerationParams(messages=generation_pb2.ChatMessages())
        with pytest.raises(grpc.aio.AioRpcError) as rpc:
            await stub.Generate(text_generation_pb2.GenerateRequest(params=empty), timeout=30)
        assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_model_without_a_chat_template_is_failed_precondition(tmp_path: Path) -> None:
    handle = await _serve(tmp_path, None)  # the demo model ships no template
    try:
        async with AsyncClient(handle.address, timeout=30, retries=0) as client:
            with pytest.raises(FailedPreconditionError, match="no chat template"):
                await client.chat([{"role": "user", "content": "1"}], **GREEDY)
            assert (await client.generate("1+2=", **GREEDY)).text == "3"  # text prompts still served
    finally:
        await asyncio.wait_for(handle.stop(0), timeout=60)


def test_template_end_of_turn_token_joins_eos(tmp_path: Path) -> None:
    from tokenrelay_engines.torch.runner import ModelRunner

    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}<pad>{% endfor %}")
    runner = ModelRunner(TorchEngineConfig(model=DEMO_MODEL, chat_template=str(path),
                                           scheduler=SchedulerConfig(num_blocks=16)))
    pad = runner.tokenizer.token_to_id("<pad>")
    assert pad in runner.model_info.eos_token_ids and runner.model_info.chat_template == path.read_text()


async def test_cli_chat_through_a_pseudo_terminal(chat_server) -> None:
    pexpect = pytest.importorskip("pexpect")

    def session() -> tuple[str, int]:
        child = pexpect.spawn(sys.executable, ["-m", "tokenrelay_server.cli", "chat", "--target", chat_server.address,
                                               "--temperature", "0", "--max-tokens", "6"],
                              encoding="utf-8", timeout=60, dimensions=(24, 200))
        try:
            child.expect_exact("> ")
            child.sendline("40")
            child.expect(r"\r\n41\r\n")  # 1 message so far
            child.expect_exact("> ")
            child.sendline("40")
            child.expect(r"\r\n43\r\n")  # user, assistant, user: the conversation was kept
            child.expect_exact("> ")
            child.sendline("/reset")
            child.expect_exact("> ")
            child.sendline("40")
            child.expect(r"\r\n41\r\n")
            child.expect_exact("> ")
            child.sendeof()
            child.expect(pexpect.EOF)
            return child.before, child.wait()
        finally:
            child.close(force=True)

    _, code = await asyncio.to_thread(session)
    assert code == 0
