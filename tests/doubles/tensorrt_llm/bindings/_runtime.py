"""The double's `Executor`: in-flight batching over a deterministic stand-in model, on its own thread.

Semantics follow TensorRT-LLM's executor (docs/source/advanced/executor.md and the C++ sources
named in executor.py):
  - `enqueue_request` returns a request id at once; requests wait in a queue ordered by priority
    (higher first), then arrival; each iteration admits what fits (max_batch_size, and with
    GUARANTEED_NO_EVICT the KV blocks for prompt + max_tokens), runs the context phase of the new
    ones and one decode step of the others: in-flight batching.
  - streaming: one Response per request per iteration, `output_token_ids[0]` holding only the new
    tokens and `log_probs[0]` ALL log probs so far; non-streaming: one final Response with the
    prompt (unless exclude_input_from_output) and every generated token.
  - the final Response has `is_final` and `finish_reasons`: END_ID (the end token is part of the
    output), STOP_WORDS, LENGTH, CANCELLED. `max_tokens` beyond max_seq_len is clamped, like the
    real one (LlmRequest::validate); a prompt over max_input_len or an out-of-vocabulary token
    gets an error Response.
  - `cancel_request(id)`: the request ends at the next iteration with a final CANCELLED response
    (no new tokens); unknown or finished ids are ignored.
  - `get_latest_iteration_stats()` returns (and clears) the stats of iterations that ran since
    the previous call, at most iter_stats_max_iterations of them; idle iterations report none.
  - greedy decoding unless sampling is asked for: top_k = 1, or top_k and top_p both unset or 0
    (TensorRT-LLM's documented default: "temperature = top_p = top_k = None: greedy"; random
    sampling needs e.g. top_k = 0 with top_p = 1, as its OpenAI server sends).
The stand-in model: the next token is a hash of the context (greedy) or of the context, the seed
and the step (sampling; an unset seed is 0, as in TensorRT-LLM), so outputs are reproducible and
independent of batching. One iteration takes ITERATION_S (the simulated GPU).
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import heapq
import itertools
import json
import threading
import time
from pathlib import Path
from typing import Any

from . import executor as tl

ITERATION_S = 0.001
_DEVICE_KV_BLOCKS = 2048  # the simulated GPU's KV pool at free_gpu_memory_fraction = 1


class _Live:
    __slots__ = ("id", "request", "tokens", "log_probs", "sent", "max_new", "blocks", "finish")

    def __init__(self, rid: int, request: Any, max_new: int, blocks: int) -> None:
        self.id, self.request, self.max_new, self.blocks = rid, request, max_new, blocks
        self.tokens: list[int] = []
        self.log_probs: list[float] = []
        self.sent = 0
        self.finish: Any = None


class Executor:
    def __init__(self, model_path: Any, model_type: Any, executor_config: Any) -> None:
        if not isinstance(model_type, tl.ModelType) or not isinstance(executor_config, tl.ExecutorConfig):
            raise TypeError("__init__(): incompatible function arguments")
        if model_type != tl.ModelType.DECODER_ONLY:
            raise RuntimeError("[TensorRT-LLM][ERROR] the test double serves decoder-only engines")
        config_path = Path(model_path) / "config.json"
        if not config_path.is_file():
            raise RuntimeError(f"[TensorRT-LLM][ERROR] Failed to open {config_path}")
        config = json.loads(config_path.read_text())
        build, pretrained = config["build_config"], config["pretrained_config"]
        self._vocab = int(pretrained["vocab_size"])
        self._max_seq_len = int(build["max_seq_len"])
        self._max_input_len = int(build.get("max_input_len", self._max_seq_len))
        self._tokens_per_block = int(build.get("plugin_config", {}).get("tokens_per_block", 32))
        self._max_batch = min(executor_config.max_batch_size or build["max_batch_size"], build["max_batch_size"])
        kv = executor_config.kv_cache_config
        if kv.max_tokens:
            self._num_blocks = kv.max_tokens // self._tokens_per_block
        else:
            self._num_blocks = int(_DEVICE_KV_BLOCKS * (kv.free_gpu_memory_fraction or 0.9))
        self._no_evict = (executor_config.scheduler_config.capacity_scheduler_policy
                          == tl.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT)
        self._cv = threading.Condition()
        self._queue: list[tuple[float, int, _Live]] = []  # heap of (-priority, arrival, request)
        self._active: dict[int, _Live] = {}
        self._cancels: set[int] = set()
        self._responses: collections.deque[Any] = collections.deque()
        self._stats: collections.deque[Any] = collections.deque(maxlen=max(executor_config.iter_stats_max_iterations, 0))
        self._ids = itertools.count(1)
        self._arrival = itertools.count()
        self._iter = 0
        self._used_blocks = 0
        self._shutdown = False
        self._tick = threading.Event()  # set only at shutdown: waiting on it is the simulated forward pass
        self.enqueued: list[Any] = []  # double only: every Request as received (for mapping tests)
        self._thread = threading.Thread(target=self._loop, name="trtllm-double-executor", daemon=True)
        self._thread.start()

    # ---- the bindings' methods --------------------------------------------------------------

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        with self._cv:
            self._shutdown = True
            self._cv.notify_all()
        self._tick.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def can_enqueue_requests(self) -> bool:
        return not self._shutdown

    def enqueue_request(self, request: Any) -> int:
        if not isinstance(request, tl.Request):
            raise TypeError("enqueue_request(): incompatible function arguments")
        if not request.input_token_ids:
            raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: input token ids must not be empty")
        with self._cv:
            if self._shutdown:
                raise RuntimeError("[TensorRT-LLM][ERROR] Assertion failed: Shutdown called, cannot enqueue")
            rid = next(self._ids)
            self.enqueued.append(request)
            max_new = min(request.max_tokens, self._max_seq_len - len(request.input_token_ids))
            blocks = -(-(len(request.input_token_ids) + max(max_new, 0)) // self._tokens_per_block)
            heapq.heappush(self._queue, (-request.priority, next(self._arrival), _Live(rid, request, max_new, blocks)))
            self._cv.notify_all()
            return rid

    def enqueue_requests(self, requests: list[Any]) -> list[int]:
        return [self.enqueue_request(r) for r in requests]

    def cancel_request(self, id: int | None = None) -> None:  # noqa: A002 - the bindings' argument name
        if id is None:
            return
        with self._cv:
            self._cancels.add(int(id))
            self._cv.notify_all()

    def get_num_responses_ready(self, id: int | None = None) -> int:  # noqa: A002
        with self._cv:
            return sum(1 for r in self._responses if id is None or r.request_id == id)

    def await_responses(self, *args: Any, **kwargs: Any) -> Any:
        """await_responses(timeout=None) | await_responses(id, timeout=None) | await_responses(ids, timeout=None)."""
        target: Any = kwargs.pop("id", kwargs.pop("ids", None))
        timeout = kwargs.pop("timeout", None)
        if kwargs:
            raise TypeError("await_responses(): incompatible function arguments")
        if args and isinstance(args[0], (int, list)):
            target, args = args[0], args[1:]
        if args:
            timeout = args[0]
        if timeout is not None and not isinstance(timeout, datetime.timedelta):
            raise TypeError("await_responses(): timeout must be a datetime.timedelta")
        ids = None if target is None else ({target} if isinstance(target, int) else set(target))
        end = None if timeout is None else time.monotonic() + timeout.total_seconds()
        with self._cv:
            while not any(ids is None or r.request_id in ids for r in self._responses) and not self._shutdown:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cv.wait(left)
            taken = [r for r in self._responses if ids is None or r.request_id in ids]
            self._responses = collections.deque(r for r in self._responses if not (ids is None or r.request_id in ids))
        if isinstance(target, list):
            return [[r for r in taken if r.request_id == i] for i in target]
        return taken

    def get_latest_iteration_stats(self) -> list[Any]:
        with self._cv:
            out = list(self._stats)
            self._stats.clear()
            return out

    def get_latest_request_stats(self) -> list[Any]:
        return []

    # ---- the simulated device ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._shutdown or self._queue or self._active or self._cancels):
                    self._cv.wait()
                if self._shutdown:
                    return
                self._apply_cancels()
                new = self._admit()
            self._tick.wait(ITERATION_S)
            with self._cv:
                if self._shutdown:
                    return
                self._apply_cancels()
                self._step(new)
                self._cv.notify_all()

    def _apply_cancels(self) -> None:
        for rid in self._cancels:
            live = self._active.get(rid) or next((q[2] for q in self._queue if q[2].id == rid), None)
            if live is not None and live.finish is None:
                live.finish = tl.FinishReason.CANCELLED
                self._respond(live)
                self._release(live)
        self._cancels.clear()
        self._queue = [q for q in self._queue if q[2].finish is None]
        heapq.heapify(self._queue)

    def _admit(self) -> int:
        admitted = 0
        while self._queue and len(self._active) < self._max_batch:
            live = self._queue[0][2]
            prompt = live.request.input_token_ids
            error = None
            if len(prompt) > self._max_input_len:
                error = f"Prompt length ({len(prompt)}) exceeds maximum input length ({self._max_input_len})."
            elif any(not 0 <= t < self._vocab for t in prompt):
                error = f"Token id out of range [0, {self._vocab})."
            if error is None and self._no_evict and self._used_blocks + live.blocks > self._num_blocks:
                break  # waits for KV room
            heapq.heappop(self._queue)
            if error is not None:
                self._responses.append(tl.Response(live.id, f"[TensorRT-LLM][ERROR] {error}"))
                continue
            self._active[live.id] = live
            self._used_blocks += live.blocks
            admitted += 1
        return admitted

    def _release(self, live: _Live) -> None:
        if self._active.pop(live.id, None) is not None:
            self._used_blocks -= live.blocks

    def _step(self, num_new: int) -> None:
        if not self._active:
            return
        self._iter += 1
        start = time.monotonic()
        num_ctx = sum(1 for live in self._active.values() if not live.tokens)
        for live in list(self._active.values()):
            token, log_prob = self._next_token(live)
            live.tokens.append(token)
            live.log_probs.append(log_prob)
            end_id = live.request.end_id
            if end_id is not None and end_id >= 0 and token == end_id:
                live.finish = tl.FinishReason.END_ID
            elif any(w and live.tokens[-len(w):] == list(w) for w in (live.request.stop_words or [])):
                live.finish = tl.FinishReason.STOP_WORDS
            elif len(live.tokens) >= live.max_new:
                live.finish = tl.FinishReason.LENGTH
            if live.request.streaming or live.finish is not None:
                self._respond(live)
            if live.finish is not None:
                self._release(live)
        self._record_stats(start, num_new, num_ctx)

    def _next_token(self, live: _Live) -> tuple[int, float]:
        sc = live.request.sampling_config
        context = (*live.request.input_token_ids, *live.tokens)
        greedy = sc.top_k == 1 or (not sc.top_k and not sc.top_p)
        key = (context,) if greedy else (context, sc.seed or 0, len(live.tokens))
        u = int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little")
        token = u % self._vocab
        end_id = live.request.end_id
        if end_id is not None and end_id >= 0:
            if (u >> 20) % 16 == 0:
                token = end_id
            if token == end_id and len(live.tokens) < (sc.min_tokens or 0):  # min_tokens bans the end id
                token = (token + 1) % self._vocab
        return token, -0.01 - ((u >> 32) % 1000) / 500.0

    def _respond(self, live: _Live) -> None:
        request = live.request
        result = tl.Result()
        if request.streaming:
            result.output_token_ids = [live.tokens[live.sent:]]
        else:
            prefix = [] if request.output_config.exclude_input_from_output else request.input_token_ids
            result.output_token_ids = [[*prefix, *live.tokens]]
        live.sent = len(live.tokens)
        if request.output_config.return_log_probs:
            result.log_probs = [list(live.log_probs)]
            result.cum_log_probs = [sum(live.log_probs)]
        result.is_final = result.is_sequence_final = live.finish is not None
        result.finish_reasons = [live.finish or tl.FinishReason.NOT_FINISHED]
        result.decoding_iter = len(live.tokens)
        self._responses.append(tl.Response(live.id, result, request.client_id))

    def _record_stats(self, start: float, num_new: int, num_ctx: int) -> None:
        if self._stats.maxlen == 0:
            return
        kv = tl.KvCacheStats()
        kv.max_num_blocks, kv.used_num_blocks = self._num_blocks, self._used_blocks
        kv.free_num_blocks, kv.tokens_per_block = self._num_blocks - self._used_blocks, self._tokens_per_block
        ifb = tl.InflightBatchingStats()
        ifb.num_scheduled_requests = len(self._active) + num_new
        ifb.num_context_requests, ifb.num_gen_requests = num_ctx, max(0, len(self._active) - num_ctx)
        stats = tl.IterationStats()
        stats.timestamp = datetime.datetime.now().strftime("%m-%d-%Y %H:%M:%S")
        stats.iter, stats.iter_latency_ms = self._iter, (time.monotonic() - start) * 1000
        stats.num_new_active_requests = num_new
        stats.num_active_requests, stats.num_queued_requests = len(self._active), len(self._queue)
        stats.max_num_active_requests = self._max_batch
        stats.kv_cache_stats, stats.inflight_batching_stats = kv, ifb
        self._stats.append(stats)
