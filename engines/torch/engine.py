"""The reference PyTorch engine in process: the engine core on a thread of the server process.

engine thread (owns the engine core, hence the scheduler, the runner and every tensor; and the
output processor, hence the detokenizers):
    drain new requests and aborts -> core.step() -> output processor (text, stop strings)
    -> deltas into per-request output slots; stop-string matches abort in the core

The event loop only validates, enqueues, and reads output slots. A slot holds at most one
merged delta, so a slow consumer costs one pending output per request, never a queue.
`--engine-process on` runs the same core in its own process instead (engines/core/client.py).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from tokenrelay_engines import tokenization
from tokenrelay_engines.base import EngineDeadError, EngineStats, FinishReason, InvalidRequest, ModelInfo, Request
from tokenrelay_engines.config import TorchEngineConfig
from tokenrelay_engines.core.engine_core import EngineCore
from tokenrelay_engines.core.messages import StepOutputs
from tokenrelay_engines.core.output_processor import OutputProcessor, core_request
from tokenrelay_engines.core.validation import check_request
from tokenrelay_engines.torch.streams import OutputSlot, RequestStream

_JOIN_TIMEOUT_S = 60.0


@dataclasses.dataclass(slots=True, eq=False)
class _Add:
    request: Request  # as the caller sent it (stop strings, caller's id); seed resolved
    core_id: str
    slot: OutputSlot


class TorchEngine:
    def __init__(self, config: TorchEngineConfig,
                 runner_factory: Callable[[TorchEngineConfig], Any] | None = None) -> None:
        self.config = config
        self._runner_factory = runner_factory
        self._runner: Any = None
        self._core: EngineCore | None = None
        self._processor: OutputProcessor | None = None
        self._thread: threading.Thread | None = None
        self._cv = threading.Condition()
        self._inbox: collections.deque[_Add | str] = collections.deque()  # guarded by _cv; str: abort
        self._stopping = False  # guarded by _cv
        self._dead: str | None = None  # why the engine cannot serve; guarded by _cv
        self._in_flight: dict[str, str] = {}  # caller's request id -> core id (event loop)
        self._stats = EngineStats(0, 0, 0, 0)
        self._rng = random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log = logging.getLogger(__name__)

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._loop = asyncio.get_running_loop()
        self._runner = await asyncio.to_thread(self._build_runner)  # imports and loads off the loop
        self._core = EngineCore(self._runner, self.config.scheduler)
        self._processor = OutputProcessor(self._runner.tokenizer)
        self._stats = self._core.stats()
        self._thread = threading.Thread(target=self._run, name="tokenrelay-engine", daemon=True)
        self._thread.start()

    def _build_runner(self) -> Any:
        factory = self._runner_factory
        if factory is None:
            from tokenrelay_engines.torch.runner import ModelRunner
            factory = ModelRunner
        return factory(self.config)

    async def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._dead = self._dead or "engine shut down"
            self._cv.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, _JOIN_TIMEOUT_S)

    # ---- the AsyncEngine surface (event loop) ------------------------------------------

    def info(self) -> ModelInfo:
        if self._core is None:
            raise EngineDeadError("engine not started")
        return self._core.model_info

    def stats(self) -> EngineStats:
        if self._processor is None:
            return self._stats
        return dataclasses.replace(self._stats, tokens_per_second=self._processor.throughput.rate(time.monotonic()))

    async def check_health(self) -> None:
        if self._thread is None:
            raise EngineDeadError("engine not started")
        with self._cv:
            dead = self._dead
        if dead is not None:
            raise EngineDeadError(dead)
        if not self._thread.is_alive():
            raise EngineDeadError("engine thread exited")

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.info()
        return tokenization.encode(self._runner.tokenizer, text, add_special_tokens)

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        self.info()
        return tokenization.decode(self._runner.tokenizer, token_ids, skip_special_tokens)

    def add_request(self, request: Request) -> RequestStream:
        self._validate(request)
        if request.sampling.seed is None:
            request = dataclasses.replace(
                request, sampling=dataclasses.replace(request.sampling, seed=self._rng.getrandbits(63)))
        assert self._loop is not None
        slot = OutputSlot(self._loop)
        core_id = request.request_id  # unique among those in flight; the core sees the caller's id
        with self._cv:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            self._inbox.append(_Add(request, core_id, slot))
            self._cv.notify_all()
        self._in_flight[request.request_id] = core_id
        return RequestStream(request.request_id, slot, on_close=self._on_stream_closed)

    async def abort(self, request_id: str) -> None:
        core_id = self._in_flight.get(request_id)
        if core_id is not None:
            self._submit_abort(core_id)

    def _submit_abort(self, core_id: str) -> None:
        with self._cv:
            self._inbox.append(core_id)
            self._cv.notify_all()

    def _on_stream_closed(self, request_id: str, finished: bool) -> None:
        core_id = self._in_flight.pop(request_id, None)
        if not finished and core_id is not None:
            self._submit_abort(core_id)

    def _validate(self, request: Request) -> None:
        info = self.info()
        with self._cv:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
        if request.request_id in self._in_flight:
            raise InvalidRequest("request_id", f"{request.request_id!r} is already in flight")
        assert self._core is not None and info is self._core.model_info
        check_request(request, self._core.limits)

    # ---- the engine thread -------------------------------------------------------------

    def _run(self) -> None:
        core, processor = self._core, self._processor
        assert core is not None and processor is not None
        commands: list[_Add | str] = []
        try:
            while True:
                with self._cv:
                    while not self._inbox and not self._stopping and (core.stalled or not core.has_unfinished):
                        deadline = core.next_deadline() if core.stalled else None
                        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                        if not self._cv.wait(timeout) and timeout is not None:
                            core.stalled = False
                            break  # a deadline passed
                    commands = list(self._inbox)
                    self._inbox.clear()
                    if self._stopping:
                        break
                self._apply(commands)
                commands = []
                if core.has_unfinished:
                    self._publish(core.step())
                self._stats = core.stats()
        except BaseException as exc:  # noqa: BLE001 - any failure kills the engine, loudly
            self._log.exception("engine loop failed; the engine is dead")
            self._die(f"engine loop failed: {type(exc).__name__}: {exc}")
            return
        self._cancel_everything(commands)

    def _apply(self, commands: list[_Add | str]) -> None:
        core, processor = self._core, self._processor
        assert core is not None and processor is not None
        for command in commands:
            if isinstance(command, _Add):
                processor.add(command.core_id, command.request, command.slot)
                self._publish(core.add(core_request(command.request, command.core_id)))
            else:
                self._publish(core.abort([command]))

    def _publish(self, step: StepOutputs) -> None:
        if not step:
            return
        assert self._core is not None and self._processor is not None
        deliveries, aborts = self._processor.process(step)
        if aborts:
            self._core.abort(aborts)  # finished by a stop string: the core frees them now
        self._stats = self._core.stats()
        self._processor.deliver(deliveries)

    def _cancel_everything(self, commands: list[_Add | str]) -> None:
        """Shutdown: every request still held or queued ends with CANCELLED."""
        assert self._core is not None and self._processor is not None
        for command in commands:
            if isinstance(command, _Add):
                self._processor.add(command.core_id, command.request, command.slot)
        self._core.abort_all()
        self._processor.finish_all(FinishReason.CANCELLED)
        self._stats = self._core.stats()

    def _die(self, reason: str) -> None:
        """The runner or the loop failed: no request is served again; all in flight get ERROR."""
        assert self._core is not None and self._processor is not None
        with self._cv:
            self._dead = reason
            commands = list(self._inbox)
            self._inbox.clear()
        for command in commands:
            if isinstance(command, _Add):
                self._processor.add(command.core_id, command.request, command.slot)
        self._core.free_all()
        self._processor.finish_all(FinishReason.ERROR, reason)
