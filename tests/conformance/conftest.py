"""Engines under the conformance suite: one registry of factories, one `engine` fixture.

Each factory is an async context manager that yields a *started* `AsyncEngine` and shuts it
down on exit. Adding an engine to the suite is one line in `ENGINE_CASES` (plus its factory);
engines that need hardware carry marks (e.g. `pytest.mark.gpu`) and skip where it is missing.

The fixture's teardown calls `shutdown()` even when the test already did: shutting an engine
down twice must be harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from tokenrelay_engines.base import AsyncEngine

START_TIMEOUT_S = 120.0  # loading a model on two busy cores
SHUTDOWN_TIMEOUT_S = 60.0

EngineFactory = Callable[[], contextlib.AbstractAsyncContextManager[AsyncEngine]]


@dataclass(slots=True, frozen=True)
class EngineCase:
    """One engine under test: its test id, a factory, and pytest marks (e.g. gpu)."""

    name: str
    factory: EngineFactory
    marks: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("an engine case needs a name")


@contextlib.asynccontextmanager
async def _running(engine: AsyncEngine) -> AsyncIterator[AsyncEngine]:
    await asyncio.wait_for(engine.start(), START_TIMEOUT_S)
    try:
        yield engine
    finally:
        await asyncio.wait_for(engine.shutdown(), SHUTDOWN_TIMEOUT_S)


def synthetic_engine() -> contextlib.AbstractAsyncContextManager[AsyncEngine]:
    from tokenrelay_engines.synthetic import SyntheticEngine, SyntheticEngineConfig

    # Fast, but slow enough that a 200-token request is still running when a test aborts it.
    config = SyntheticEngineConfig(ttft_ms=1.0, itl_ms=1.0, block_size=16, num_kv_blocks=512,
                                   context_length=512)
    return _running(SyntheticEngine(config))


def demo_model_ready() -> bool:
    """The embedded demo model is served when its directory is complete (it may be in training)."""
    root = Path(str(resources.files("tokenrelay_engines.torch").joinpath("demo_model")))
    return all((root / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def _torch_config():
    from tokenrelay_engines.config import SchedulerConfig, TorchEngineConfig

    scheduler = SchedulerConfig(block_size=16, num_blocks=128, max_model_len=512)
    if demo_model_ready():
        config = TorchEngineConfig(model="demo", device="cpu", dtype="float32", scheduler=scheduler)
    else:
        config = TorchEngineConfig(load_format="dummy", dummy_shape="tiny", device="cpu",
                                   dtype="float32", scheduler=scheduler)
    return config


def torch_engine() -> contextlib.AbstractAsyncContextManager[AsyncEngine]:
    from tokenrelay_engines.torch.engine import TorchEngine

    return _running(TorchEngine(_torch_config()))


def torch_core_process_engine() -> contextlib.AbstractAsyncContextManager[AsyncEngine]:
    """The same engine core in its own process, behind the front end's client (--engine-process on)."""
    from tokenrelay_engines.core.client import EngineCoreClient

    return _running(EngineCoreClient(_torch_config()))


@contextlib.asynccontextmanager
async def _trtllm_on_double() -> AsyncIterator[AsyncEngine]:
    from tokenrelay_engines.config import TrtllmEngineConfig
    from tokenrelay_engines.trtllm.engine import TrtllmEngine

    from .trtllm_double import installed, write_engine_dir

    with tempfile.TemporaryDirectory() as tmp, installed():
        engine_dir = write_engine_dir(Path(tmp) / "engine")
        async with _running(TrtllmEngine(TrtllmEngineConfig(engine_dir=str(engine_dir)))) as engine:
            yield engine


def trtllm_double_engine() -> contextlib.AbstractAsyncContextManager[AsyncEngine]:
    """The TensorRT-LLM backend over the executor test double (tests/doubles/tensorrt_llm)."""
    return _trtllm_on_double()


def trtllm_engine() -> contextlib.AbstractAsyncContextManager[AsyncEngine]:
    """The TensorRT-LLM backend over the real library and a real engine directory (GPU)."""
    from tokenrelay_engines.config import TrtllmEngineConfig
    from tokenrelay_engines.trtllm.engine import TrtllmEngine

    from .trtllm_double import REAL_ENGINE_DIR_ENV, real_library

    if not real_library():
        pytest.skip(f"needs TensorRT-LLM and {REAL_ENGINE_DIR_ENV}=<a trtllm-build output directory>")
    return _running(TrtllmEngine(TrtllmEngineConfig(engine_dir=os.environ[REAL_ENGINE_DIR_ENV])))


ENGINE_CASES: tuple[EngineCase, ...] = (
    EngineCase("synthetic", synthetic_engine),
    EngineCase("torch", torch_engine),
    EngineCase("torch-core-process", torch_core_process_engine),
    EngineCase("trtllm-double", trtllm_double_engine),
    EngineCase("trtllm", trtllm_engine, marks=(pytest.mark.gpu,)),
)


@pytest.fixture(params=[pytest.param(case, id=case.name, marks=case.marks) for case in ENGINE_CASES])
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[AsyncEngine]:
    case: EngineCase = request.param
    async with case.factory() as started:
        yield started
