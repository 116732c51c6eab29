"""`tokenrelay serve --engine trtllm --model ENGINE_DIR --tokenizer DIR` through the real gRPC server,
on the TensorRT-LLM executor test double (the real library cannot be installed here)."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

import grpc
import pytest
from tokenrelay.v1 import generation_pb2 as gen
from tokenrelay.v1 import text_generation_pb2 as tg
from tokenrelay.v1 import text_generation_pb2_grpc

from conformance.trtllm_double import installed, write_engine_dir
from tokenrelay_engines.trtllm.engine import TrtllmEngine
from tokenrelay_server import main as server_main
from tokenrelay_server.app import start_server


@pytest.fixture
async def trtllm_stub():
    with tempfile.TemporaryDirectory() as tmp, installed():
        engine_dir = write_engine_dir(Path(tmp) / "engine")
        tokenizer_dir = Path(tmp) / "hf"
        tokenizer_dir.mkdir()
        (tokenizer_dir / "tokenizer.json").write_bytes((engine_dir / "tokenizer.json").read_bytes())
        (engine_dir / "tokenizer.json").unlink()  # the tokenizer comes from --tokenizer
        parser = argparse.ArgumentParser()
        server_main.add_serve_arguments(parser)
        args = parser.parse_args(["--engine", "trtllm", "--model", str(engine_dir), "--tokenizer", str(tokenizer_dir),
                                  "--host", "127.0.0.1", "--port", "0", "--max-num-seqs", "4"])
        config = server_main.config_from_args(args)
        assert (config.trtllm.engine_dir, config.trtllm.tokenizer) == (str(engine_dir), str(tokenizer_dir))
        handle = await asyncio.wait_for(start_server(config), timeout=60)
        try:
            assert isinstance(handle.engine, TrtllmEngine)
            async with grpc.aio.insecure_channel(handle.address) as channel:
                yield text_generation_pb2_grpc.TextGenerationServiceStub(channel), handle
        finally:
            await asyncio.wait_for(handle.stop(0), timeout=60)


async def test_trtllm_engine_serves_stream_and_unary(trtllm_stub) -> None:
    stub, handle = trtllm_stub
    info = await stub.GetModelInfo(tg.GetModelInfoRequest(), timeout=30)
    assert info.engine == "trtllm" and info.context_length == 512
    p = gen.GenerationParams(text="12+34=", sampling=gen.SamplingParams(temperature=1.0, seed=42),
                             stopping=gen.StoppingCriteria(max_tokens=8, ignore_eos=True), logprobs=0)
    unary = (await stub.Generate(tg.GenerateRequest(params=p), timeout=60)).result
    events = [e async for e in stub.GenerateStream(tg.GenerateStreamRequest(params=p), timeout=60)]
    deltas = [e.delta for e in events[1:-1]]
    assert [t for d in deltas for t in d.token_ids] == list(unary.token_ids) and len(unary.token_ids) == 8
    assert "".join(d.text for d in deltas) == unary.text
    assert len(unary.logprobs) == 8 and unary.seed == 42
    assert unary.finish_reason == gen.FINISH_REASON_LENGTH
    # the sampled token's logprob only: asking for alternatives is a clear INVALID_ARGUMENT
    bad = gen.GenerationParams(text="12+34=", stopping=gen.StoppingCriteria(max_tokens=4), logprobs=2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(tg.GenerateRequest(params=bad), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    load = await stub.GetServerLoad(tg.GetServerLoadRequest(), timeout=30)
    assert load.kv_blocks_total > 0
