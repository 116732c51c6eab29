"""The front end's engine: an `AsyncEngine` in front of an engine-core process.

It owns what the issue gives the front end: admission checks (engines/core/validation.py),
tokenization, the seed, incremental detokenization and stop strings, and the output slots
(output_processor.py). The engine core owns the scheduler, block manager and runner in its own
process (engines/core/process.py), so the model's forward pass and the gRPC servers no longer
share a GIL.

The core's death is seen at once: its end of the socket closes when the process exits (also on
SIGKILL), the read loop gets EOF, every open request ends with ERROR and `check_health` raises
`EngineDeadError` from then on. A core that hangs without exiting (stopped, wedged) falls silent:
a thread of it sends a heartbeat every 0.2 s, and a watchdog here declares the core dead after
0.7 s without a frame (and kills the process it spawned at shutdown rather than waiting on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import socket
import subprocess
import sys
import time

import msgspec
from tokenizers import Tokenizer

from tokenrelay_engines import tokenization
from tokenrelay_engines.base import EngineDeadError, EngineStats, FinishReason, InvalidRequest, ModelInfo, Request
from tokenrelay_engines.config import TorchEngineConfig
from tokenrelay_engines.core.messages import (
    FRAME_HEADER, HEARTBEAT_TIMEOUT_S, Abort, AddRequest, CoreDead, FrameEncoder, Hello, Shutdown, StepOutputs,
    Utility, UtilityResult, core_message_decoder,
)
from tokenrelay_engines.core.output_processor import OutputProcessor, core_request
from tokenrelay_engines.core.priority import shift_priority
from tokenrelay_engines.core.validation import EngineLimits, check_request
from tokenrelay_engines.torch.streams import OutputSlot, RequestStream

log = logging.getLogger(__name__)
_EXIT_TIMEOUT_S = 30.0


def spawn_engine_core(config: TorchEngineConfig, *, socket_fd: int | None = None,
                      listen_fd: int | None = None, log_level: str = "INFO") -> subprocess.Popen:
    """Start `python -m tokenrelay_engines.core.process` (a fresh interpreter) with one socket."""
    fd = socket_fd if socket_fd is not None else listen_fd
    assert fd is not None
    flag = "--socket-fd" if socket_fd is not None else "--listen-fd"
    argv = [sys.executable, "-m", "tokenrelay_engines.core.process", flag, str(fd),
            "--parent-pid", str(os.getpid()), "--log-level", log_level,
            "--config-json", msgspec.json.encode(config).decode()]
    return subprocess.Popen(argv, pass_fds=(fd,), stdin=subprocess.DEVNULL)


class EngineCoreClient:
    """`address` empty: spawn and own a core process (one front end); else connect to the core
    listening there (one of `--api-server-count` front ends; the supervisor owns the core)."""

    def __init__(self, config: TorchEngineConfig, address: str = "") -> None:
        self.config = config
        self._address = address
        self._process: subprocess.Popen | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._info: ModelInfo | None = None
        self._limits: EngineLimits | None = None
        self._tokenizer: Tokenizer | None = None
        self._processor: OutputProcessor | None = None
        self._encoder = FrameEncoder()
        self._decoder = core_message_decoder()
        self._in_flight: dict[str, str] = {}  # caller's request id -> core id
        self._id_prefix = ""  # the core's prefix for this front end's request ids (from Hello)
        self._next_id = 0
        self._calls: dict[int, asyncio.Future] = {}
        self._stats = EngineStats(0, 0, 0, 0)
        self._dead: str | None = None
        self._hung = False  # dead because it fell silent, not because it exited
        self._last_heard = 0.0  # loop time of the last frame from the core
        self._watchdog_task: asyncio.Task | None = None
        self._rng = random.Random()

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError("engine already started")
        self._loop = asyncio.get_running_loop()
        if self._address:
            self._reader, self._writer = await asyncio.open_unix_connection(self._address)
        else:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self._process = spawn_engine_core(self.config, socket_fd=theirs.fileno(),
                                                  log_level=logging.getLevelName(logging.getLogger().level))
            finally:
                theirs.close()
            self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        try:
            hello = await self._read_message()
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            code = await self._exit_code()
            raise RuntimeError(f"the engine core process failed to start (exit code {code})") from exc
        if not isinstance(hello, Hello):
            raise RuntimeError(f"the engine core answered {type(hello).__name__} before Hello")
        if self.config.core_priority and not hello.priority_raised:  # the core could not: we step down
            lowered = shift_priority(self.config.core_priority)
            log.info("engine core priority: this front end %s its nice value by %d",
                     "raised" if lowered else "could not raise", self.config.core_priority)
        self._info = hello.model_info
        self._id_prefix = hello.id_prefix
        self._limits = EngineLimits(hello.model_info, hello.num_blocks, hello.block_size)
        self._tokenizer = Tokenizer.from_str(hello.tokenizer_json)
        self._processor = OutputProcessor(self._tokenizer)
        self._stats = EngineStats(0, 0, 0, hello.num_blocks)
        self._last_heard = self._loop.time()
        self._read_task = asyncio.create_task(self._read_loop(), name="tokenrelay-engine-core-reader")
        self._watchdog_task = asyncio.create_task(self._watchdog(), name="tokenrelay-engine-core-watchdog")

    async def _exit_code(self) -> int | None:
        if self._process is None:
            return None
        try:
            return await asyncio.to_thread(self._process.wait, _EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None

    async def shutdown(self) -> None:
        if self._dead is None:
            self._dead = "engine shut down"
        if self._processor is not None:
            self._processor.finish_all(FinishReason.CANCELLED)
        if self._writer is not None and not self._writer.is_closing():
            with contextlib.suppress(ConnectionError, RuntimeError):
                self._writer.write(self._encoder.encode(Shutdown()))
                await asyncio.wait_for(self._writer.drain(), 5.0)
            self._writer.close()
        if self._watchdog_task is not None:
            self._watchdog_task.cancel()
        if self._process is not None and self._hung and self._process.poll() is None:
            log.warning("killing the engine core process: it stopped answering")
            self._process.kill()
        if self._process is not None and await self._exit_code() is None:
            log.warning("engine core did not exit within %.0fs: killing it", _EXIT_TIMEOUT_S)
            self._process.kill()
            await asyncio.to_thread(self._process.wait)
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(BaseException):
                await self._read_task

    # ---- reading the core ------------------------------------------------------------------

    async def _read_message(self):
        assert self._reader is not None
        header = await self._reader.readexactly(FRAME_HEADER.size)
        (n,) = FRAME_HEADER.unpack(header)
        return self._decoder.decode(await self._reader.readexactly(n))

    async def _read_loop(self) -> None:
        assert self._loop is not None
        try:
            while True:
                message = await self._read_message()
                self._last_heard = self._loop.time()
                if isinstance(message, StepOutputs):
                    self._on_step(message)
                elif isinstance(message, UtilityResult):
                    future = self._calls.pop(message.call_id, None)
                    if future is not None and not future.done():
                        future.set_result(message.stats)
                elif isinstance(message, CoreDead):
                    self._die(message.reason)
                    return
        except asyncio.CancelledError:
            raise
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            self._die(f"engine core connection lost ({type(exc).__name__})")
        except Exception as exc:  # noqa: BLE001 - a bad frame: nothing more can be trusted
            log.exception("engine core reader failed")
            self._die(f"engine core reader failed: {type(exc).__name__}: {exc}")

    async def _watchdog(self) -> None:
        """Declare the core dead when no frame (step, heartbeat, ...) came for HEARTBEAT_TIMEOUT_S.

        A check that itself ran late (this event loop was blocked) proves nothing: frames may be
        waiting unread, so the silence is measured again from there."""
        assert self._loop is not None
        loop, period = self._loop, HEARTBEAT_TIMEOUT_S / 7
        while self._dead is None:
            before = loop.time()
            await asyncio.sleep(period)
            now = loop.time()
            if now - before > 2 * period:
                self._last_heard = max(self._last_heard, now - period)
                continue
            if now - self._last_heard > HEARTBEAT_TIMEOUT_S:
                self._hung = True
                self._die(f"engine core sent nothing for {now - self._last_heard:.1f}s (hung)")
                return

    def _on_step(self, step: StepOutputs) -> None:
        assert self._processor is not None
        if step.stats is not None:
            self._stats = step.stats
        deliveries, aborts = self._processor.process(step)
        if aborts:
            self._send(Abort(aborts))  # finished by a stop string: the core frees them
        self._processor.deliver(deliveries)

    def _die(self, reason: str) -> None:
        if self._dead is not None:
            return  # shut down (or dead) already
        log.error("engine core is dead: %s", reason)
        self._dead = reason
        if self._processor is not None:
            self._processor.finish_all(FinishReason.ERROR, reason)
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(reason))
        self._calls.clear()
        if self._writer is not None:
            self._writer.close()

    def _send(self, message: msgspec.Struct) -> None:
        if self._writer is None or self._writer.is_closing():
            return
        self._writer.write(self._encoder.encode(message))

    # ---- the AsyncEngine surface -------------------------------------------------------------

    def info(self) -> ModelInfo:
        if self._info is None:
            raise EngineDeadError("engine not started")
        return self._info

    def stats(self) -> EngineStats:
        if self._processor is None:
            return self._stats
        return dataclasses.replace(self._stats, tokens_per_second=self._processor.throughput.rate(time.monotonic()))

    async def stats_from_core(self, timeout: float = 5.0) -> EngineStats:
        """A utility call: the core's stats now (not as of its last step)."""
        self._check_alive()
        assert self._loop is not None
        call_id = self._next_id
        self._next_id += 1
        future = self._loop.create_future()
        self._calls[call_id] = future
        self._send(Utility(call_id, "stats"))
        return await asyncio.wait_for(future, timeout)

    def _check_alive(self) -> None:
        if self._loop is None:
            raise EngineDeadError("engine not started")
        if self._dead is None and self._process is not None and self._process.poll() is not None:
            self._die(f"engine core process exited with code {self._process.returncode}")
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    async def check_health(self) -> None:
        self._check_alive()

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.info()
        return tokenization.encode(self._tokenizer, text, add_special_tokens)

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        self.info()
        return tokenization.decode(self._tokenizer, token_ids, skip_special_tokens)

    def add_request(self, request: Request) -> RequestStream:
        self.info()
        self._check_alive()
        if request.request_id in self._in_flight:
            raise InvalidRequest("request_id", f"{request.request_id!r} is already in flight")
        assert self._limits is not None and self._processor is not None and self._loop is not None
        check_request(request, self._limits)
        if request.sampling.seed is None:
            request = dataclasses.replace(
                request, sampling=dataclasses.replace(request.sampling, seed=self._rng.getrandbits(63)))
        core_id = f"{self._id_prefix}{self._next_id}"
        self._next_id += 1
        slot = OutputSlot(self._loop)
        self._processor.add(core_id, request, slot)
        self._in_flight[request.request_id] = core_id
        self._send(AddRequest(core_request(request, core_id)))
        return RequestStream(request.request_id, slot, on_close=self._on_stream_closed)

    async def abort(self, request_id: str) -> None:
        core_id = self._in_flight.get(request_id)
        if core_id is not None:
            self._send(Abort([core_id]))  # the core answers with the final CANCELLED update

    def _on_stream_closed(self, request_id: str, finished: bool) -> None:
        core_id = self._in_flight.pop(request_id, None)
        if core_id is None or finished:
            return
        assert self._processor is not None
        self._processor.remove(core_id)
        self._send(Abort([core_id]))
