"""A synthetic engine: deterministic tokens at a configured rate, no model.

It implements the full `AsyncEngine` contract (stopping, logprobs, seeds, deadlines, abort,
emulated KV blocks) so the server, the client and the load generator can be tested and
benchmarked without a model. Timing follows an absolute schedule on the event loop clock
(`loop.call_at`, which is `time.monotonic()`): a request's first token comes `ttft_ms` after it
is scheduled, token k at `scheduled + ttft + k * itl`, so delays never accumulate drift.

Tokenizer: ids 0-3 are special (<pad>, <s>, </s>, <unk>), 4-259 are UTF-8 bytes, and the rest
are whole words from a small list (what the engine generates), each decoding to " word".
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import heapq
import itertools
import math
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tokenrelay_engines.base import (
    EngineDeadError, EngineStats, FinishReason, InvalidRequest, ModelInfo, OutputKind, Request, RequestMetrics,
    RequestOutput, TokenLogprob, Usage,
)
from tokenrelay_engines.outputs import merge_outputs

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_SPECIAL_TEXT = {PAD_ID: "<pad>", BOS_ID: "<s>", EOS_ID: "</s>", UNK_ID: "<unk>"}
_BYTE_OFFSET = 4
_WORD_OFFSET = _BYTE_OFFSET + 256
WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "a", "relay", "token",
    "stream", "of", "light", "river", "stone", "cloud", "runs", "and", "sings", "north", "wind",
    "green", "field", "under", "bright", "sky", "slow", "water", "turns", "old", "mill",
)
VOCAB_SIZE = _WORD_OFFSET + len(WORDS)


@dataclass(slots=True, frozen=True)
class SyntheticEngineConfig:
    ttft_ms: float = 20.0  # first token this long after the request is scheduled
    itl_ms: float = 5.0  # then one token every itl_ms
    max_num_seqs: int = 64  # running batch size; the rest wait
    block_size: int = 16  # emulated KV block size (tokens)
    num_kv_blocks: int = 8192  # emulated KV pool; a request reserves prompt + max_tokens
    context_length: int = 4096
    eos_rate: float = 0.0  # chance per generated token of </s> (deterministic per position)
    model_name: str = "synthetic"
    max_logprobs: int = 20
    max_stop_strings: int = 16

    def __post_init__(self) -> None:
        if self.ttft_ms < 0 or self.itl_ms < 0:
            raise ValueError("synthetic ttft_ms and itl_ms must be >= 0")
        if self.max_num_seqs < 1 or self.block_size < 1 or self.num_kv_blocks < 1:
            raise ValueError("synthetic max_num_seqs, block_size, num_kv_blocks must be >= 1")
        if self.context_length < 2:
            raise ValueError("synthetic context_length must be >= 2")
        if not 0 <= self.eos_rate <= 1:
            raise ValueError("synthetic eos_rate must be in [0, 1]")


def encode(text: str, add_special_tokens: bool = True) -> list[int]:
    ids = [b + _BYTE_OFFSET for b in text.encode("utf-8")]
    return [BOS_ID, *ids] if add_special_tokens else ids


def decode(token_ids: list[int], skip_special_tokens: bool = False) -> str:
    parts: list[str] = []
    pending = bytearray()
    for tid in token_ids:
        if _BYTE_OFFSET <= tid < _WORD_OFFSET:
            pending.append(tid - _BYTE_OFFSET)
            continue
        if pending:
            parts.append(pending.decode("utf-8", errors="replace"))
            pending.clear()
        if _WORD_OFFSET <= tid < VOCAB_SIZE:
            parts.append(" " + WORDS[tid - _WORD_OFFSET])
        elif not skip_special_tokens:
            parts.append(_SPECIAL_TEXT.get(tid, "<unk>"))
    if pending:
        parts.append(pending.decode("utf-8", errors="replace"))
    return "".join(parts)


def _token_text(tid: int) -> str:
    return " " + WORDS[tid - _WORD_OFFSET] if tid >= _WORD_OFFSET else ""


@dataclass(slots=True, eq=False)
class _Slot:
    """One request inside the synthetic engine: its schedule, output so far and queue."""

    request: Request
    seed: int
    digest: bytes  # hash of (prompt ids, seed): the root of the deterministic output
    reserved_blocks: int
    outputs: asyncio.Queue[RequestOutput] = field(default_factory=asyncio.Queue)
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # output text so far (after stop-string truncation when finished)
    sent_chars: int = 0  # how much of `text` has gone out in deltas
    scheduled_time: float | None = None
    first_token_time: float | None = None
    timer: asyncio.TimerHandle | None = None
    deadline_timer: asyncio.TimerHandle | None = None
    finished: bool = False
    seed_sent: bool = False
    held_logprobs: list[TokenLogprob] = field(default_factory=list)  # FINAL_ONLY: sent with the final output

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_ids)


class _OutputStream:
    """A request's outputs; closing it before the final output aborts the request."""

    def __init__(self, engine: SyntheticEngine, slot: _Slot) -> None:
        self._engine = engine
        self._slot = slot
        self._done = False

    def __aiter__(self) -> _OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        queue = self._slot.outputs
        out = await queue.get()
        while not out.finished and not queue.empty():  # everything that arrived meanwhile, as one delta
            out = merge_outputs(out, queue.get_nowait())
        self._done = out.finished
        return out

    async def aclose(self) -> None:
        self._done = True
        if not self._slot.finished:
            self._engine._finish(self._slot, FinishReason.CANCELLED)


class SyntheticEngine:
    """`AsyncEngine` with deterministic output and configurable timing.

    `start_gate`: when given, `start()` waits for it; tests use it to hold the server in its
    warm-up phase. `kill()` makes the engine dead (every request ends with ERROR).
    """

    def __init__(self, config: SyntheticEngineConfig, *, start_gate: asyncio.Event | None = None) -> None:
        self.config = config
        self._start_gate = start_gate
        self._slots: dict[str, _Slot] = {}
        self._waiting: list[tuple[int, int, str]] = []  # heap of (priority, order, request_id)
        self._running: set[str] = set()
        self._order = itertools.count()
        self._blocks_reserved = 0
        self._token_times: collections.deque[float] = collections.deque()
        self._started = False
        self._dead: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        if self._start_gate is not None:
            await self._start_gate.wait()
        self._loop = asyncio.get_running_loop()
        self._started = True

    async def shutdown(self) -> None:
        for rid in list(self._slots):
            self._finish(self._slots[rid], FinishReason.CANCELLED)
        self._dead = self._dead or "engine shut down"

    def kill(self, reason: str = "synthetic engine killed") -> None:
        """Simulate a crash: pending requests end with ERROR; health checks fail from now on."""
        self._dead = reason
        for rid in list(self._slots):
            self._finish(self._slots[rid], FinishReason.ERROR, error=reason)

    async def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    # -- info -------------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        c = self.config
        return ModelInfo(name=c.model_name, context_length=c.context_length, vocab_size=VOCAB_SIZE,
                         eos_token_ids=(EOS_ID,), max_logprobs=c.max_logprobs,
                         max_stop_strings=c.max_stop_strings, engine="synthetic")

    def stats(self) -> EngineStats:
        bs = self.config.block_size
        used = sum(math.ceil(self._slots[r].num_tokens / bs) for r in self._running)
        now = time.monotonic()
        while self._token_times and self._token_times[0] < now - 1.0:
            self._token_times.popleft()
        return EngineStats(running=len(self._running), waiting=len(self._slots) - len(self._running),
                           kv_blocks_used=used, kv_blocks_total=self.config.num_kv_blocks,
                           tokens_per_second=float(len(self._token_times)))

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return encode(text, add_special_tokens)

    def detokenize(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return decode(token_ids, skip_special_tokens)

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request: Request) -> AsyncIterator[RequestOutput]:
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if not self._started or self._loop is None:
            raise EngineDeadError("engine not started")
        self._validate(request)
        seed = request.sampling.seed
        if seed is None:
            seed = random.getrandbits(63)
        key_seed = 0 if request.sampling.greedy else seed
        digest = hashlib.blake2b(repr((request.prompt_token_ids, key_seed)).encode(), digest_size=16).digest()
        need = math.ceil((len(request.prompt_token_ids) + request.stopping.max_tokens) / self.config.block_size)
        slot = _Slot(request=request, seed=seed, digest=digest, reserved_blocks=need)
        self._slots[request.request_id] = slot
        heapq.heappush(self._waiting, (request.priority, next(self._order), request.request_id))
        if request.deadline is not None:
            slot.deadline_timer = self._loop.call_at(
                request.deadline, self._on_deadline, request.request_id)
        self._schedule(first_token_now=True)
        return _OutputStream(self, slot)

    def _validate(self, request: Request) -> None:
        info = self.info()
        if request.request_id in self._slots:
            raise InvalidRequest("request_id", f"request {request.request_id!r} is already running")
        total = len(request.prompt_token_ids) + request.stopping.max_tokens
        if total > info.context_length:
            raise InvalidRequest("stopping.max_tokens",
                                 f"prompt + max_tokens = {total} exceeds the context length {info.context_length}")
        if math.ceil(total / self.config.block_size) > self.config.num_kv_blocks:
            raise InvalidRequest("stopping.max_tokens", "request needs more KV blocks than the pool holds")
        for i, tid in enumerate(request.prompt_token_ids):
            if not 0 <= tid < VOCAB_SIZE:
                raise InvalidRequest(f"prompt_token_ids[{i}]", f"token id {tid} outside [0, {VOCAB_SIZE})")

    async def abort(self, request_id: str) -> None:
        slot = self._slots.get(request_id)
        if slot is not None and not slot.finished:
            self._finish(slot, FinishReason.CANCELLED)

    # -- scheduling -------------------------------------------------------------------------
    def _schedule(self, *, first_token_now: bool = False) -> None:
        """Move waiting requests into the running batch while there is room.

        `first_token_now` (from add_request only, so this never recurses through _finish): with
        ttft 0 a scheduled request's first token is made here, not on the next loop iteration
        (with itl 0 too, a FINAL_ONLY request is done before add_request returns)."""
        assert self._loop is not None
        while self._waiting and len(self._running) < self.config.max_num_seqs:
            _, _, rid = self._waiting[0]
            slot = self._slots.get(rid)
            if slot is None or slot.finished or rid in self._running:
                heapq.heappop(self._waiting)
                continue
            if self._blocks_reserved + slot.reserved_blocks > self.config.num_kv_blocks:
                return
            heapq.heappop(self._waiting)
            self._blocks_reserved += slot.reserved_blocks
            self._running.add(rid)
            slot.scheduled_time = self._loop.time()
            if first_token_now and self.config.ttft_ms == 0:
                self._on_token(rid)
            else:
                slot.timer = self._loop.call_at(slot.scheduled_time + self.config.ttft_ms / 1000,
                                                self._on_token, rid)

    def _on_deadline(self, request_id: str) -> None:
        slot = self._slots.get(request_id)
        if slot is not None and not slot.finished:
            self._finish(slot, FinishReason.DEADLINE)

    def _next_token(self, slot: _Slot) -> tuple[int, float]:
        """The next token and its log-probability, both from a hash of (prompt, seed, position)."""
        index = len(slot.output_ids)
        h = hashlib.blake2b(slot.digest + index.to_bytes(4, "little"), digest_size=8).digest()
        u = int.from_bytes(h, "little") / 2**64
        if u < self.config.eos_rate and not slot.request.stopping.ignore_eos:
            return EOS_ID, -0.5
        return _WORD_OFFSET + int.from_bytes(h[:4], "little") % len(WORDS), -0.05 - 2.0 * u

    def _logprob(self, tid: int, lp: float, n: int) -> TokenLogprob:
        top = [(tid, lp)]
        for k in range(1, n):
            alt = _WORD_OFFSET + (tid - _WORD_OFFSET + k) % len(WORDS) if tid >= _WORD_OFFSET else _WORD_OFFSET + k
            top.append((alt, round(lp - k * 0.5, 4)))
        return TokenLogprob(token_id=tid, logprob=lp, top=tuple(top[:n]))

    def _on_token(self, request_id: str) -> None:
        slot = self._slots.get(request_id)
        if slot is None or slot.finished:
            return
        assert self._loop is not None and slot.scheduled_time is not None
        # FINAL_ONLY: nobody sees a token before the end, so every token already due is made in
        # this one callback (with itl 0: the whole output), not one timer each.
        final_only = slot.request.output_kind is OutputKind.FINAL_ONLY
        while True:
            due = self._one_token(slot)
            if due is None:
                return
            if not (final_only and due <= self._loop.time()):
                slot.timer = self._loop.call_at(due, self._on_token, request_id)
                return

    def _one_token(self, slot: _Slot) -> float | None:
        """Make the next token; returns when the one after it is due (None: finished)."""
        assert self._loop is not None and slot.scheduled_time is not None
        now = self._loop.time()
        req, stop = slot.request, slot.request.stopping
        tid, lp = self._next_token(slot)
        slot.output_ids.append(tid)
        self._token_times.append(time.monotonic())
        if slot.first_token_time is None:
            slot.first_token_time = now
        n_out = len(slot.output_ids)
        past_min = n_out >= stop.min_tokens
        text_before = len(slot.text)
        finish: FinishReason | None = None
        stop_reason: str | int | None = None
        if tid == EOS_ID and past_min and not stop.ignore_eos:
            finish = FinishReason.EOS
        elif tid in stop.stop_token_ids and past_min:
            finish, stop_reason = FinishReason.STOP, tid
            if stop.include_stop_in_output:
                slot.text += _token_text(tid)
        else:
            slot.text += _token_text(tid)
            if past_min and stop.stop:
                match = self._match_stop(slot.text, text_before, stop.stop)
                if match is not None:
                    pos, s = match
                    slot.text = slot.text[:pos + len(s)] if stop.include_stop_in_output else slot.text[:pos]
                    finish, stop_reason = FinishReason.STOP, s
        if finish is None and (n_out >= stop.max_tokens
                               or len(req.prompt_token_ids) + n_out >= self.config.context_length):
            finish = FinishReason.LENGTH
        n = req.sampling.logprobs
        logprobs = [self._logprob(tid, round(lp, 4), n)] if n is not None else None
        if finish is not None:
            self._finish(slot, finish, stop_reason=stop_reason, new_ids=[tid], logprobs=logprobs)
            return None
        if req.output_kind is OutputKind.FINAL_ONLY:  # nothing goes out before the final output
            if logprobs is not None:
                slot.held_logprobs.extend(logprobs)
        else:
            self._emit(slot, [tid], len(slot.text) - self._held_back(slot.text, stop.stop), logprobs)
        return slot.scheduled_time + (self.config.ttft_ms + n_out * self.config.itl_ms) / 1000

    @staticmethod
    def _match_stop(text: str, text_before: int, stops: tuple[str, ...]) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in stops:
            pos = text.find(s, max(0, text_before - len(s) + 1))
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        return best

    @staticmethod
    def _held_back(text: str, stops: tuple[str, ...]) -> int:
        """Length of the longest tail of `text` that could start a stop string."""
        hold = 0
        for s in stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def _emit(self, slot: _Slot, ids: list[int], upto: int, logprobs: list[TokenLogprob] | None) -> None:
        upto = max(upto, slot.sent_chars)
        out = RequestOutput(request_id=slot.request.request_id, token_ids=ids,
                            text=slot.text[slot.sent_chars:upto], logprobs=logprobs)
        slot.sent_chars = upto
        if not slot.seed_sent:
            out.seed, slot.seed_sent = slot.seed, True
        slot.outputs.put_nowait(out)

    def _finish(self, slot: _Slot, reason: FinishReason, *, stop_reason: str | int | None = None,
                new_ids: list[int] | None = None, logprobs: list[TokenLogprob] | None = None,
                error: str | None = None) -> None:
        if slot.finished:
            return
        slot.finished = True
        rid = slot.request.request_id
        for timer in (slot.timer, slot.deadline_timer):
            if timer is not None:
                timer.cancel()
        if rid in self._running:
            self._running.discard(rid)
            self._blocks_reserved -= slot.reserved_blocks
        now = time.monotonic()
        if slot.request.output_kind is OutputKind.FINAL_ONLY:  # the whole output in this one
            new_ids = list(slot.output_ids)
            logprobs = slot.held_logprobs + (logprobs or []) if slot.request.sampling.logprobs is not None else None
        out = RequestOutput(
            request_id=rid, token_ids=new_ids or [], text=slot.text[slot.sent_chars:],
            logprobs=logprobs, finished=True, finish_reason=reason, stop_reason=stop_reason,
            usage=Usage(prompt_tokens=len(slot.request.prompt_token_ids), completion_tokens=len(slot.output_ids)),
            metrics=RequestMetrics(arrival_time=slot.request.arrival_time, first_scheduled_time=slot.scheduled_time,
                                   first_token_time=slot.first_token_time, finished_time=now),
            seed=slot.seed, error=error)
        slot.sent_chars = len(slot.text)
        slot.outputs.put_nowait(out)
        del self._slots[rid]
        if self._loop is not None and self._dead is None:
            self._schedule()
