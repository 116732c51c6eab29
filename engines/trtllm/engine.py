"""The TensorRT-LLM engine: our contract over TensorRT-LLM's executor (in-flight batching on the GPU).

    event loop: validate -> enqueue_request (streaming) -> per-request output slot
    response thread: await_responses(timeout) -> stop checks + detokenizer -> deltas into slots
                     get_latest_iteration_stats() -> running / waiting / KV blocks

The executor batches, schedules (by our priority) and samples; our layer validates, owns the text
(stop strings, stop token ids, extra eos ids: see mapping.py for why) and the deadlines, and
cancels the executor's request whenever we finish one before it does. A request counts as in
flight until the executor's final response for it, so `stats()` goes idle only once the executor
has released its KV blocks.

Checked against TensorRT-LLM's bindings (cpp/tensorrt_llm/nanobind/executor/executor.cpp at
commit 1dd50d0741fa3bdae3ffd2f54e53547cbe1a043d, and bindings.cpp / executorConfig.cpp, read from the
stored sources; no 1.2.x wheel can be installed here):
Executor(model_path, model_type, executor_config); enqueue_request(request) -> id;
await_responses(timeout: datetime.timedelta | None) -> list[Response]; cancel_request(id);
get_latest_iteration_stats() -> the IterationStats since the previous call; shutdown().
Streaming results carry only the new tokens (output_token_ids[beam]) but ALL log probs so far
(log_probs[beam]) - cpp/tensorrt_llm/batch_manager/llmRequest.cpp, LlmRequest::createResult.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import importlib
import logging
import random
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from tokenizers import Tokenizer

from tokenrelay_engines import tokenization
from tokenrelay_engines.base import (
    EngineDeadError, EngineStats, FinishReason, InvalidRequest, ModelInfo, Request, RequestMetrics,
    RequestOutput, TokenLogprob, Usage,
)
from tokenrelay_engines.config import TrtllmEngineConfig
from tokenrelay_engines.detokenizer import IncrementalDetokenizer
from tokenrelay_engines.torch.streams import OutputSlot, RequestStream, Throughput
from tokenrelay_engines.trtllm import mapping
from tokenrelay_engines.trtllm.model_dir import EngineDirInfo, load_tokenizer, read_engine_dir

BINDINGS_MODULE = "tensorrt_llm.bindings.executor"
_AWAIT_TIMEOUT = datetime.timedelta(milliseconds=50)  # bounds how long shutdown waits for the thread
_CANCEL_GRACE_S = 30.0  # a cancelled request with no final response after this is dropped
_MAX_ERROR_CHARS = 512
_JOIN_TIMEOUT_S = 60.0


@dataclasses.dataclass(slots=True, eq=False)
class _Tracked:
    request: Request
    seed: int
    detokenizer: IncrementalDetokenizer
    slot: OutputSlot
    arrival_time: float
    executor_id: int | None = None  # None: never enqueued
    num_tokens: int = 0  # output tokens accepted (sent or about to be)
    sent_first: bool = False
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished: bool = False  # the client saw (or is about to see) its final output
    cancelled_at: float | None = None  # we asked the executor to cancel it
    deadline_timer: asyncio.TimerHandle | None = None  # on the event loop


class TrtllmEngine:
    def __init__(self, config: TrtllmEngineConfig, bindings: ModuleType | None = None) -> None:
        """`bindings`: the `tensorrt_llm.bindings.executor` module; imported in start() when None."""
        self.config = config
        self._bindings = bindings
        self._tllm: ModuleType | None = None
        self._executor: Any = None
        self._tokenizer: Tokenizer | None = None
        self._dir: EngineDirInfo | None = None
        self._info: ModelInfo | None = None
        self._eos: frozenset[int] = frozenset()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._dead: str | None = None  # guarded by _lock
        self._by_id: dict[str, _Tracked] = {}  # client-facing, until the final output; guarded by _lock
        self._live: dict[int, _Tracked] = {}  # executor id -> request, until its final response; _lock
        self._latest: Any = None  # the latest IterationStats; guarded by _lock
        self._throughput = Throughput()
        self._rng = random.Random()
        self._log = logging.getLogger(__name__)

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        if not self.config.engine_dir:
            raise ValueError("the trtllm engine needs --model ENGINE_DIR (a trtllm-build output directory)")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        tllm = self._bindings or importlib.import_module(BINDINGS_MODULE)
        engine_dir = Path(self.config.engine_dir).expanduser()
        tokenizer_dir = Path(self.config.tokenizer).expanduser() if self.config.tokenizer else engine_dir
        self._tokenizer = load_tokenizer(tokenizer_dir)
        self._dir = info = read_engine_dir(engine_dir, tokenizer_dir, self._tokenizer)
        context = min(info.max_seq_len, self.config.max_model_len or info.max_seq_len)
        self._info = ModelInfo(name=info.name, context_length=context, vocab_size=info.vocab_size,
                               eos_token_ids=info.eos_token_ids, max_logprobs=0, engine="trtllm")
        self._eos = frozenset(info.eos_token_ids)
        self._executor = await asyncio.to_thread(
            tllm.Executor, engine_dir, tllm.ModelType.DECODER_ONLY, self._executor_config(tllm, info))
        self._tllm = tllm
        self._thread = threading.Thread(target=self._run, name="tokenrelay-trtllm", daemon=True)
        self._thread.start()

    def _executor_config(self, tllm: ModuleType, info: EngineDirInfo) -> Any:
        c = self.config
        kv = tllm.KvCacheConfig(enable_block_reuse=c.enable_block_reuse,
                                free_gpu_memory_fraction=c.kv_cache_free_gpu_memory_fraction)
        # GUARANTEED_NO_EVICT: a request is admitted only with KV room for all of its tokens.
        scheduler = tllm.SchedulerConfig(tllm.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT)
        return tllm.ExecutorConfig(
            max_beam_width=1, scheduler_config=scheduler, kv_cache_config=kv,
            max_batch_size=min(c.max_batch_size or info.max_batch_size, info.max_batch_size),
            max_num_tokens=min(c.max_num_tokens or info.max_num_tokens, info.max_num_tokens),
            gather_generation_logits=False)  # NVIDIA/TensorRT-LLM#10810: see mapping.py

    async def shutdown(self) -> None:
        with self._lock:
            self._dead = self._dead or "engine shut down"
            for tracked in list(self._by_id.values()):
                self._finish(tracked, FinishReason.CANCELLED)
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, _JOIN_TIMEOUT_S)
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown)

    # ---- the AsyncEngine surface (event loop) ------------------------------------------

    def info(self) -> ModelInfo:
        if self._info is None:
            raise EngineDeadError("engine not started")
        return self._info

    def stats(self) -> EngineStats:
        assert self._dir is not None
        with self._lock:
            live, latest = len(self._live), self._latest
        kv = getattr(latest, "kv_cache_stats", None)
        # Until the executor's first iteration reports its pool: the engine's own upper bound.
        total = kv.max_num_blocks if kv is not None and kv.max_num_blocks > 0 else \
            self._dir.max_batch_size * -(-self._dir.max_seq_len // self._dir.tokens_per_block)
        running = min(live, latest.num_active_requests) if live and latest is not None else 0
        used = kv.used_num_blocks if live and kv is not None else 0
        return EngineStats(running=running, waiting=live - running, kv_blocks_used=used, kv_blocks_total=total,
                           tokens_per_second=self._throughput.rate(time.monotonic()))

    async def check_health(self) -> None:
        if self._thread is None:
            raise EngineDeadError("engine not started")
        with self._lock:
            dead = self._dead
        if dead is not None:
            raise EngineDeadError(dead)
        if not self._thread.is_alive():
            raise EngineDeadError("response thread exited")

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.info()
        return tokenization.encode(self._tokenizer, text, add_special_tokens)

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        self.info()
        return tokenization.decode(self._tokenizer, token_ids, skip_special_tokens)

    def add_request(self, request: Request) -> RequestStream:
        self._validate(request)
        seed = request.sampling.seed if request.sampling.seed is not None else self._rng.getrandbits(63)
        stopping = request.stopping
        tracked = _Tracked(request, seed,
                           IncrementalDetokenizer(self._tokenizer, request.prompt_token_ids, stopping.stop,
                                                  stopping.include_stop_in_output),
                           OutputSlot(self._loop), request.arrival_time or time.monotonic())
        rid = request.request_id
        stream = RequestStream(rid, tracked.slot, on_close=self._on_stream_closed)
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            self._by_id[rid] = tracked
            if request.deadline is not None and request.deadline <= time.monotonic():
                self._finish(tracked, FinishReason.DEADLINE)
                return stream
            executor_request = mapping.build_request(self._tllm, request, seed=seed,
                                                     end_id=self._info.eos_token_ids[0])
            try:
                tracked.executor_id = self._executor.enqueue_request(executor_request)
            except Exception as exc:  # the executor's own validation: the request, not the engine
                del self._by_id[rid]
                raise InvalidRequest("request", f"rejected by TensorRT-LLM: {str(exc)[:_MAX_ERROR_CHARS]}") from exc
            self._live[tracked.executor_id] = tracked
        if request.deadline is not None:
            tracked.deadline_timer = self._loop.call_at(request.deadline, self._expire, tracked)
        return stream

    async def abort(self, request_id: str) -> None:
        self._abort(request_id, FinishReason.CANCELLED)

    def _abort(self, request_id: str, reason: FinishReason) -> None:
        with self._lock:
            tracked = self._by_id.get(request_id)
            if tracked is not None:
                self._finish(tracked, reason)

    def _expire(self, tracked: _Tracked) -> None:
        with self._lock:
            if not tracked.finished:
                self._finish(tracked, FinishReason.DEADLINE)

    def _on_stream_closed(self, request_id: str, finished: bool) -> None:
        if not finished:
            self._abort(request_id, FinishReason.CANCELLED)

    def _validate(self, request: Request) -> None:
        info = self.info()
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            if request.request_id in self._by_id:
                raise InvalidRequest("request_id", f"{request.request_id!r} is already in flight")
        prompt = request.prompt_token_ids
        if any(not 0 <= t < info.vocab_size for t in prompt):
            raise InvalidRequest("prompt", f"token ids must be in [0, {info.vocab_size})")
        if len(prompt) >= info.context_length or len(prompt) > self._dir.max_input_len:
            raise InvalidRequest("prompt", f"{len(prompt)} tokens: the engine takes at most "
                                           f"{min(info.context_length - 1, self._dir.max_input_len)}")
        stopping = request.stopping
        if len(prompt) + stopping.max_tokens > info.context_length:
            raise InvalidRequest("stopping.max_tokens", f"prompt ({len(prompt)}) + max_tokens "
                                 f"({stopping.max_tokens}) exceeds the context ({info.context_length})")
        if request.sampling.logprobs is not None and request.sampling.logprobs > info.max_logprobs:
            raise InvalidRequest("logprobs", "TensorRT-LLM returns the sampled token's logprob only: "
                                             f"must be <= {info.max_logprobs}")
        if len(stopping.stop) > info.max_stop_strings:
            raise InvalidRequest("stopping.stop", f"at most {info.max_stop_strings} stop strings")
        if any(not 0 <= t < info.vocab_size for t in stopping.stop_token_ids):
            raise InvalidRequest("stopping.stop_token_ids", f"token ids must be in [0, {info.vocab_size})")

    # ---- the response thread -----------------------------------------------------------

    def _run(self) -> None:
        executor = self._executor
        try:
            while not self._stopping.is_set():
                responses = executor.await_responses(timeout=_AWAIT_TIMEOUT)
                iteration_stats = executor.get_latest_iteration_stats()
                now = time.monotonic()
                with self._lock:
                    for response in responses:
                        self._on_response(response, now)
                    if iteration_stats:
                        self._latest = iteration_stats[-1]
                    self._drop_stale_cancels(now)
        except BaseException as exc:  # noqa: BLE001 - any failure kills the engine, loudly
            self._log.exception("TensorRT-LLM response loop failed; the engine is dead")
            self._die(f"response loop failed: {type(exc).__name__}: {str(exc)[:_MAX_ERROR_CHARS]}")

    def _on_response(self, response: Any, now: float) -> None:
        tracked = self._live.get(response.request_id)
        if tracked is None:
            return
        if response.has_error():
            del self._live[response.request_id]
            if not tracked.finished:
                self._finish(tracked, FinishReason.ERROR, error=str(response.error_msg)[:_MAX_ERROR_CHARS])
            return
        result = response.result
        if tracked.first_scheduled_time is None:
            tracked.first_scheduled_time = now
        if not tracked.finished:
            self._absorb(tracked, result, now)
        if result.is_final:
            del self._live[response.request_id]
            if not tracked.finished:
                reasons = list(result.finish_reasons)
                self._finish(tracked, mapping.finish_reason(self._tllm, reasons[0] if reasons else None))

    def _absorb(self, tracked: _Tracked, result: Any, now: float) -> None:
        """The new tokens of one streaming result: stop checks, then one delta (or the final)."""
        beams = result.output_token_ids
        new_ids = list(beams[0]) if beams else []
        if not new_ids:
            return
        if tracked.first_token_time is None:
            tracked.first_token_time = now
        request = tracked.request
        accepted: list[int] = []
        stop = None
        for token in new_ids:
            accepted.append(token)
            stop = mapping.check_stop(request.stopping, self._eos, tracked.detokenizer,
                                      tracked.num_tokens + len(accepted), token)
            if stop is not None:
                break
        logprobs = None
        if request.sampling.logprobs is not None:
            so_far = list(result.log_probs[0]) if result.log_probs else []  # all tokens so far
            window = so_far[tracked.num_tokens:tracked.num_tokens + len(accepted)]
            logprobs = [TokenLogprob(t, float(lp)) for t, lp in zip(accepted, window)]
        tracked.num_tokens += len(accepted)
        self._throughput.record(now, len(accepted))
        if stop is not None:
            self._finish(tracked, stop[0], stop_reason=stop[1], token_ids=accepted, logprobs=logprobs)
        else:
            self._put(tracked, RequestOutput(request.request_id, token_ids=accepted,
                                             text=tracked.detokenizer.take_text(), logprobs=logprobs))

    def _put(self, tracked: _Tracked, out: RequestOutput) -> None:
        if not tracked.sent_first or out.finished:
            out.seed = tracked.seed
            tracked.sent_first = True
        tracked.slot.put(out)

    def _finish(self, tracked: _Tracked, reason: FinishReason, *, stop_reason: str | int | None = None,
                token_ids: list[int] | None = None, logprobs: list[TokenLogprob] | None = None,
                error: str | None = None) -> None:
        """The client's final output; cancels the executor's request if it is still running. Holds _lock."""
        if tracked.finished:
            return
        tracked.finished = True
        request = tracked.request
        self._by_id.pop(request.request_id, None)
        timer, tracked.deadline_timer = tracked.deadline_timer, None
        if timer is not None:
            if threading.get_ident() == self._loop_thread:
                timer.cancel()
            else:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to cancel
                    self._loop.call_soon_threadsafe(timer.cancel)
        if reason not in (FinishReason.CANCELLED, FinishReason.ERROR):
            tracked.detokenizer.finish()
        out = RequestOutput(
            request.request_id, token_ids=token_ids or [], text=tracked.detokenizer.take_text(),
            logprobs=logprobs if logprobs is not None or request.sampling.logprobs is None else [],
            finished=True, finish_reason=reason, stop_reason=stop_reason,
            usage=Usage(len(request.prompt_token_ids), tracked.num_tokens),
            metrics=RequestMetrics(tracked.arrival_time, tracked.first_scheduled_time,
                                   tracked.first_token_time, time.monotonic()),
            error=error)
        self._put(tracked, out)
        eid = tracked.executor_id
        if eid is not None and eid in self._live and tracked.cancelled_at is None and self._executor is not None:
            tracked.cancelled_at = time.monotonic()
            self._executor.cancel_request(eid)

    def _drop_stale_cancels(self, now: float) -> None:
        for eid, tracked in list(self._live.items()):
            if tracked.cancelled_at is not None and now - tracked.cancelled_at > _CANCEL_GRACE_S:
                self._log.warning("no final response for cancelled executor request %d; dropping it", eid)
                del self._live[eid]

    def _die(self, reason: str) -> None:
        with self._lock:
            self._dead = reason
            self._live.clear()  # the executor is not asked for anything any more
            for tracked in list(self._by_id.values()):
                self._finish(tracked, FinishReason.ERROR, error=reason)
