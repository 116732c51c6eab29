"""The reference PyTorch engine: our scheduler driving the model runner on one thread.

engine thread (owns the scheduler and the runner, hence every tensor):
    drain new requests and aborts -> scheduler.schedule() -> runner.execute(batch)
    -> scheduler.update(outputs) -> publish deltas to per-request output slots

The event loop only validates, enqueues, and reads output slots. A slot holds at most one
merged delta, so a slow consumer costs one pending output per request, never a queue.
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
from typing import TYPE_CHECKING, Any

from tokenrelay_engines.base import (
    EngineDeadError, EngineStats, FinishReason, InvalidRequest, ModelInfo, Request, RequestMetrics,
    RequestOutput, Usage,
)
from tokenrelay_engines.config import TorchEngineConfig
from tokenrelay_engines import tokenization
from tokenrelay_engines.detokenizer import IncrementalDetokenizer
from tokenrelay_engines.scheduler.block_manager import BlockManager
from tokenrelay_engines.scheduler.scheduler import Scheduler
from tokenrelay_engines.scheduler.sequence import Sequence, SequenceStatus
from tokenrelay_engines.torch.streams import OutputSlot, RequestStream, Throughput, wake_slots

if TYPE_CHECKING:
    from tokenrelay_engines.torch.runner import ModelRunner

_JOIN_TIMEOUT_S = 60.0


@dataclasses.dataclass(slots=True, eq=False)
class _Tracked:
    """Engine-thread view of one request: its sequence, text view and output slot."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer
    slot: OutputSlot
    arrival_time: float
    num_sent_tokens: int = 0
    sent_first: bool = False


class TorchEngine:
    def __init__(self, config: TorchEngineConfig,
                 runner_factory: Callable[[TorchEngineConfig], Any] | None = None) -> None:
        self.config = config
        self._runner_factory = runner_factory
        self._runner: ModelRunner | Any = None
        self._info: ModelInfo | None = None
        self._scheduler: Scheduler | None = None
        self._block_manager: BlockManager | None = None
        self._thread: threading.Thread | None = None
        self._cv = threading.Condition()
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()  # guarded by _cv
        self._stopping = False  # guarded by _cv
        self._dead: str | None = None  # why the engine cannot serve; guarded by _cv
        self._in_flight: set[str] = set()  # request ids with an open slot (event loop)
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._stats = EngineStats(0, 0, 0, 0)
        self._throughput = Throughput()
        self._rng = random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log = logging.getLogger(__name__)

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._loop = asyncio.get_running_loop()
        self._runner = await asyncio.to_thread(self._build_runner)  # imports and loads off the loop
        model_info: ModelInfo = self._runner.model_info
        max_len = model_info.context_length
        if self.config.scheduler.max_model_len:
            max_len = min(max_len, self.config.scheduler.max_model_len)
        self._info = dataclasses.replace(model_info, context_length=max_len)
        self._block_manager = BlockManager(self._runner.num_blocks, self._runner.block_size,
                                           self.config.scheduler.enable_prefix_caching)
        self._scheduler = Scheduler(self.config.scheduler, self._block_manager,
                                    model_info.eos_token_ids, max_len)
        self._stats = EngineStats(0, 0, 0, self._block_manager.num_blocks)
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
        if self._info is None:
            raise EngineDeadError("engine not started")
        return self._info

    def stats(self) -> EngineStats:
        return dataclasses.replace(self._stats, tokens_per_second=self._throughput.rate(time.monotonic()))

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
        seed = request.sampling.seed
        if seed is None:
            seed = self._rng.getrandbits(63)
        seq = Sequence(request, seed)
        detok = IncrementalDetokenizer(self._runner.tokenizer, request.prompt_token_ids,
                                       request.stopping.stop, request.stopping.include_stop_in_output)
        assert self._loop is not None
        slot = OutputSlot(self._loop)
        rid = request.request_id
        with self._cv:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            self._inbox.append(("add", _Tracked(seq, detok, slot, request.arrival_time or time.monotonic())))
            self._cv.notify_all()
        self._in_flight.add(rid)
        return RequestStream(rid, slot, on_close=self._on_stream_closed)

    async def abort(self, request_id: str) -> None:
        self._submit_abort(request_id)

    def _submit_abort(self, request_id: str) -> None:
        with self._cv:
            self._inbox.append(("abort", request_id))
            self._cv.notify_all()

    def _on_stream_closed(self, request_id: str, finished: bool) -> None:
        self._in_flight.discard(request_id)
        if not finished:
            self._submit_abort(request_id)

    def _validate(self, request: Request) -> None:
        info = self.info()
        with self._cv:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
        if request.request_id in self._in_flight:
            raise InvalidRequest("request_id", f"{request.request_id!r} is already in flight")
        prompt = request.prompt_token_ids
        if any(not 0 <= t < info.vocab_size for t in prompt):
            raise InvalidRequest("prompt", f"token ids must be in [0, {info.vocab_size})")
        if len(prompt) >= info.context_length:
            raise InvalidRequest("prompt", f"{len(prompt)} tokens leave no room in the "
                                           f"{info.context_length}-token context")
        stopping = request.stopping
        total = len(prompt) + stopping.max_tokens
        if total > info.context_length:
            raise InvalidRequest("stopping.max_tokens", f"prompt ({len(prompt)}) + max_tokens "
                                 f"({stopping.max_tokens}) exceeds the context ({info.context_length})")
        assert self._block_manager is not None
        if self._block_manager.blocks_for(total) > self._block_manager.num_blocks:
            raise InvalidRequest("stopping.max_tokens", f"prompt + max_tokens ({total} tokens) "
                                 "exceeds the KV cache capacity")
        logprobs = request.sampling.logprobs
        if logprobs is not None and logprobs > info.max_logprobs:
            raise InvalidRequest("logprobs", f"must be <= {info.max_logprobs}")
        if len(stopping.stop) > info.max_stop_strings:
            raise InvalidRequest("stopping.stop", f"at most {info.max_stop_strings} stop strings")
        if any(not 0 <= t < info.vocab_size for t in stopping.stop_token_ids):
            raise InvalidRequest("stopping.stop_token_ids", f"token ids must be in [0, {info.vocab_size})")

    # ---- the engine thread -------------------------------------------------------------

    def _run(self) -> None:
        sched = self._scheduler
        assert sched is not None
        stalled = False  # the last schedule() changed nothing: wait for input or a deadline
        try:
            while True:
                with self._cv:
                    while not self._inbox and not self._stopping and (stalled or not sched.has_unfinished):
                        deadline = sched.next_deadline() if stalled else None
                        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                        if not self._cv.wait(timeout) and timeout is not None:
                            break  # a deadline passed
                    commands = list(self._inbox)
                    self._inbox.clear()
                    if self._stopping:
                        break
                self._apply(commands)
                self._publish(sched.finish_expired(time.monotonic()))
                out = sched.schedule()
                self._publish(out.finished)
                stalled = out.is_empty and not out.preempted and not out.finished
                if out.is_empty:
                    self._refresh_stats()
                    continue
                runner_out = self._runner.execute(out)
                touched = sched.update(out, runner_out)
                self._throughput.record(time.monotonic(), len(runner_out.token_ids))
                self._publish(touched)
        except BaseException as exc:  # noqa: BLE001 - any failure kills the engine, loudly
            self._log.exception("engine loop failed; the engine is dead")
            self._die(f"engine loop failed: {type(exc).__name__}: {exc}")
            return
        self._cancel_everything(commands)

    def _apply(self, commands: list[tuple[str, Any]]) -> None:
        sched = self._scheduler
        assert sched is not None
        for kind, arg in commands:
            if kind == "add":
                tracked: _Tracked = arg
                self._tracked[tracked.seq.request_id] = tracked
                sched.add(tracked.seq, tracked.detokenizer)
                if tracked.seq.is_finished:
                    self._publish([tracked.seq])
            else:
                seq = sched.abort(arg)
                if seq is not None:
                    self._publish([seq])

    def _publish(self, seqs: list[Sequence]) -> None:
        if not seqs:
            return
        self._refresh_stats()
        to_wake: list[OutputSlot] = []
        for seq in seqs:
            tracked = self._tracked.get(seq.request_id)
            if tracked is None or tracked.seq is not seq:
                continue
            output = self._delta(tracked)
            if output is not None and tracked.slot.put_nowake(output):
                to_wake.append(tracked.slot)
            if seq.is_finished:
                del self._tracked[seq.request_id]
        if to_wake:
            assert self._loop is not None
            wake_slots(self._loop, to_wake)  # one call into the event loop per step, not one per request

    def _delta(self, tracked: _Tracked) -> RequestOutput | None:
        seq = tracked.seq
        new_ids = seq.token_ids[seq.num_prompt_tokens + tracked.num_sent_tokens:]  # only the new ones
        finished = seq.is_finished
        if not new_ids and not finished:
            return None
        detok = tracked.detokenizer
        if finished and seq.finish_reason not in (FinishReason.CANCELLED, FinishReason.ERROR):
            detok.finish()
        out = RequestOutput(seq.request_id, token_ids=new_ids, text=detok.take_text())
        if seq.request.sampling.logprobs is not None:
            out.logprobs = list(seq.output_logprobs[tracked.num_sent_tokens:])
        tracked.num_sent_tokens += len(new_ids)
        if not tracked.sent_first or finished:
            out.seed = seq.seed
            tracked.sent_first = True
        if finished:
            now = time.monotonic()
            out.finished = True
            out.finish_reason = seq.finish_reason
            out.stop_reason = seq.stop_reason
            out.usage = Usage(seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_tokens)
            out.metrics = RequestMetrics(tracked.arrival_time, seq.first_scheduled_time,
                                         seq.first_token_time, now)
        return out

    def _refresh_stats(self) -> None:
        sched, bm = self._scheduler, self._block_manager
        assert sched is not None and bm is not None
        self._stats = EngineStats(sched.num_running, sched.num_waiting, bm.num_used_blocks,
                                  bm.num_blocks, num_preemptions=sched.num_preemptions)

    def _cancel_everything(self, commands: list[tuple[str, Any]]) -> None:
        """Shutdown: every request still held or queued ends with CANCELLED."""
        sched = self._scheduler
        assert sched is not None
        for kind, arg in commands:
            if kind == "add":
                self._tracked[arg.seq.request_id] = arg
        for tracked in list(self._tracked.values()):
            seq = tracked.seq
            if sched.abort(seq.request_id) is None and not seq.is_finished:
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, FinishReason.CANCELLED
            self._publish([seq])

    def _die(self, reason: str) -> None:
        """The runner or the loop failed: no request is served again; all in flight get ERROR."""
        with self._cv:
            self._dead = reason
            commands = list(self._inbox)
            self._inbox.clear()
        for kind, arg in commands:
            if kind == "add":
                self._tracked[arg.seq.request_id] = arg
        for tracked in list(self._tracked.values()):
            seq = tracked.seq
            try:
                self._block_manager.free(seq)
            except Exception:  # noqa: BLE001 - the pool is abandoned anyway
                pass
            out = RequestOutput(seq.request_id, finished=True, finish_reason=FinishReason.ERROR,
                                usage=Usage(seq.num_prompt_tokens, max(seq.num_output_tokens, 0)),
                                seed=seq.seed, error=reason)
            tracked.slot.put(out)
        self._tracked.clear()
