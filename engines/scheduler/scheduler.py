"""Iteration-level continuous batching over plain Python state.

Each step `schedule()` builds one batch under a token budget: decode tokens of running
sequences first, then chunked prefill (partially prefilled running sequences, then waiting
ones admitted in (priority, arrival) order). When KV blocks run out, the lowest-priority,
youngest running sequence is preempted by recompute. `update()` folds the runner's sampled
tokens back in and runs the stop checks.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections.abc import Callable

from tokenrelay_engines.base import FinishReason
from tokenrelay_engines.config import SchedulerConfig
from tokenrelay_engines.scheduler.block_manager import BlockManager
from tokenrelay_engines.scheduler.sequence import (
    RunnerOutput,
    ScheduledChunk,
    SchedulerOutput,
    Sequence,
    SequenceStatus,
)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        eos_token_ids: tuple[int, ...] | list[int],
        max_model_len: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.clock = clock
        self.waiting: list[Sequence] = []  # sorted by _key
        self.running: list[Sequence] = []  # sorted by _key
        self.num_preemptions = 0
        self._keys: dict[str, tuple[int, float, int]] = {}
        self._counter = itertools.count()
        self._left: list[str] = []  # request ids that left the running batch since schedule()
        self._with_deadline: dict[str, Sequence] = {}  # unfinished sequences that have a deadline
        self._last_all_decode = False  # the last non-empty step decoded every running sequence
        self._no_ids: frozenset[int] = frozenset()

    # ---- bookkeeping -------------------------------------------------------------------

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def _key(self, seq: Sequence) -> tuple[int, float, int]:
        return self._keys[seq.request_id]

    def _insert(self, queue: list[Sequence], seq: Sequence) -> None:
        bisect.insort(queue, seq, key=self._key)

    def add(self, seq: Sequence) -> None:
        """Queue `seq`. A sequence that can never run is finished at once with LENGTH."""
        rid = seq.request_id
        if rid in self._keys:
            raise ValueError(f"request {rid!r} is already scheduled")
        req = seq.request
        self._keys[rid] = (req.priority, req.arrival_time, next(self._counter))
        seq.status = SequenceStatus.WAITING
        stopping = req.stopping
        seq.max_num_tokens = min(seq.num_prompt_tokens + stopping.max_tokens, self.max_model_len)
        stop_ids = self._no_ids if stopping.ignore_eos else self.eos_token_ids  # shared sets: the common case
        seq.stop_check_ids = stop_ids.union(stopping.stop_token_ids) if stopping.stop_token_ids else stop_ids
        if req.deadline is not None:
            self._with_deadline[rid] = seq
        if seq.num_tokens >= self.max_model_len:
            self._finish(seq, FinishReason.LENGTH)
            return
        self._insert(self.waiting, seq)

    def abort(self, request_id: str) -> Sequence | None:
        """Finish the request with CANCELLED and free its blocks; None if not held here."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    self._finish(seq, FinishReason.CANCELLED)
                    return seq
        return None

    def finish_expired(self, now: float | None = None) -> list[Sequence]:
        """Finish every sequence whose deadline has passed with DEADLINE."""
        if not self._with_deadline:  # the common case costs nothing per step
            return []
        now = self.clock() if now is None else now
        expired = [s for s in self._with_deadline.values() if now >= s.request.deadline]  # type: ignore[operator]
        for seq in expired:
            self._finish(seq, FinishReason.DEADLINE)
        return expired

    def next_deadline(self) -> float | None:
        return min((s.request.deadline for s in self._with_deadline.values()), default=None)  # type: ignore[type-var]

    def _finish(self, seq: Sequence, reason: FinishReason, stop_reason: str | int | None = None) -> None:
        rid = seq.request_id
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._left.append(rid)
        self._with_deadline.pop(rid, None)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self._keys.pop(rid, None)

    def _preempt(self, seq: Sequence, out: SchedulerOutput, budget: list[int]) -> None:
        """Preempt by recompute: free the blocks, back to waiting, keep the output tokens."""
        for i, chunk in enumerate(out.chunks):
            if chunk.seq is seq:
                budget[0] += chunk.num_new_tokens
                del out.chunks[i]
                break
        self.running.remove(seq)
        self.block_manager.free(seq)
        self._left.append(seq.request_id)
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.num_preemptions += 1
        self._insert(self.waiting, seq)
        out.preempted.append(seq)

    # ---- one step ----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out, num_decode = self._schedule()
        if out.chunks:  # an empty step is not run: the ids wait for the next one that is
            out.finished_req_ids, self._left = self._left, []
            # one decode token for every running sequence, in running order
            all_decode = num_decode == len(out.chunks) == len(self.running)
            out.decode_continues = all_decode and self._last_all_decode and not out.finished_req_ids
            self._last_all_decode = all_decode
        return out

    def _schedule(self) -> tuple[SchedulerOutput, int]:
        """This step's batch, and how many of its chunks are the decode tokens of step 1."""
        out = SchedulerOutput()
        budget = [self.config.max_num_batched_tokens]  # boxed: _preempt refunds into it

        # 1. decode: one token for every running sequence whose prompt is computed (the common
        #    case inline: its blocks already cover the new token)
        running = SequenceStatus.RUNNING
        block_size = self.block_manager.block_size
        prefilling: list[Sequence] = []  # running sequences not fully computed, in running order
        add_chunk = out.chunks.append
        left = budget[0]  # budget[0], kept in a local on the common path
        for seq in list(self.running):
            if seq.status is not running:
                continue
            last = len(seq.token_ids) - 1
            if seq.num_computed_tokens != last:
                if seq.num_computed_tokens < last:
                    prefilling.append(seq)
                continue
            if left < 1:
                break
            if len(seq.block_table) * block_size > last:
                add_chunk(ScheduledChunk(seq, last, 1))
                left -= 1
            else:
                budget[0] = left
                if self._grow(seq, last + 1, out, budget):
                    self._emit(seq, 1, out, budget)
                left = budget[0]
        budget[0] = left
        num_decode = len(out.chunks)

        # 2. chunked prefill of running sequences not fully computed yet (a preempted one is
        #    back in waiting by now: skipped)
        for seq in prefilling:
            if seq.status is not running:
                continue
            if budget[0] < 1:
                break
            n = self._fit_chunk(seq, min(seq.num_tokens - seq.num_computed_tokens, budget[0]), out, budget)
            if n > 0:
                self._emit(seq, n, out, budget)

        # 3. admit waiting sequences in (priority, arrival) order; none when blocks ran short
        #    above, and never one preempted in this very step (no thrashing)
        if out.preempted or out.finished:
            return out, num_decode
        while self.waiting and budget[0] > 0:
            seq = self.waiting[0]
            if any(p is seq for p in out.preempted):
                break
            if seq.num_computed_tokens == 0 and not seq.block_table:
                cached = self.block_manager.allocate_prefix(seq)
                seq.num_computed_tokens = seq.num_cached_tokens = cached
            want = min(seq.num_tokens - seq.num_computed_tokens, budget[0])
            room = self._make_room(seq, want, out, budget)
            want = min(want, budget[0])
            n = min(want, self.block_manager.capacity(seq) - seq.num_computed_tokens)
            if not room or n < 1:
                never_fits = not self.running and n < 1  # the whole pool cannot take one more token
                self.block_manager.free(seq)  # drop the prefix blocks it was about to share
                seq.num_computed_tokens = seq.num_cached_tokens = 0
                if never_fits:
                    self._finish(seq, FinishReason.LENGTH)
                    out.finished.append(seq)
                    continue
                break
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = self.clock()
            self._insert(self.running, seq)
            self.block_manager.allocate(seq, seq.num_computed_tokens + n)
            self._emit(seq, n, out, budget)
        return out, num_decode

    def _emit(self, seq: Sequence, n: int, out: SchedulerOutput, budget: list[int]) -> None:
        out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
        budget[0] -= n

    def _victim(self) -> Sequence | None:
        return self.running[-1] if self.running else None

    def _grow(self, seq: Sequence, num_tokens: int, out: SchedulerOutput, budget: list[int]) -> bool:
        """Cover `num_tokens` for running `seq`, preempting from the tail; False if seq itself went."""
        bm = self.block_manager
        while not bm.can_allocate(seq, num_tokens):
            victim = self._victim()
            if victim is seq and len(self.running) == 1:
                # Alone and still out of blocks: the pool can never hold it.
                self._finish(seq, FinishReason.LENGTH)
                out.finished.append(seq)
                return False
            self._preempt(victim, out, budget)
            if victim is seq:
                return False
        bm.allocate(seq, num_tokens)
        return True

    def _fit_chunk(self, seq: Sequence, want: int, out: SchedulerOutput, budget: list[int]) -> int:
        """Largest prefill chunk <= want that blocks allow (preempting if none does)."""
        bm = self.block_manager
        start = seq.num_computed_tokens
        if bm.capacity(seq) - start < 1 and not self._grow(seq, start + 1, out, budget):
            return 0
        n = min(want, budget[0], bm.capacity(seq) - start)
        if n < 1:
            return 0
        bm.allocate(seq, start + n)
        return n

    def _make_room(self, seq: Sequence, want: int, out: SchedulerOutput, budget: list[int]) -> bool:
        """Admission check for waiting `seq`; preempt strictly worse running ones if needed."""
        bm = self.block_manager
        start = seq.num_computed_tokens
        while True:
            seats = len(self.running) < self.config.max_num_seqs
            blocks = bm.can_allocate(seq, start + want) or (not self.running and bm.capacity(seq) > start)
            if seats and blocks:
                return True
            victim = self._victim()
            if victim is None or self._key(victim)[0] <= self._key(seq)[0]:
                # No strictly worse running sequence: admit a shorter chunk if blocks allow.
                return seats and bm.capacity(seq) - start >= min(want, bm.block_size)
            self._preempt(victim, out, budget)

    # ---- fold the runner's answer back in ----------------------------------------------

    def update(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[Sequence]:
        """Append sampled tokens, run stop checks, free finished; return the sequences touched."""
        now = self.clock()
        touched: list[Sequence] = []
        running = SequenceStatus.RUNNING
        token_ids, logprobs = runner_output.token_ids, runner_output.logprobs
        deadlines = self._with_deadline  # empty: no sequence has a deadline
        for chunk in scheduler_output.chunks:
            seq = chunk.seq
            if seq.status is not running:
                continue  # aborted or finished since schedule()
            start = chunk.start
            end = seq.num_computed_tokens = start + chunk.num_new_tokens
            if start < seq.num_prompt_tokens:
                self.block_manager.register_prefix(seq)
            tokens = seq.token_ids
            if end == len(tokens):  # the chunk sampled
                token = token_ids.get(seq.request_id)
                if token is None:
                    raise RuntimeError(f"runner returned no token for {seq.request_id!r}")
                tokens.append(token)
                if logprobs:
                    logprob = logprobs.get(seq.request_id)
                    if logprob is not None:
                        seq.output_logprobs.append(logprob)
                if seq.first_token_time is None:
                    seq.first_token_time = now
                # the full check only where this token could end the sequence
                if (token in seq.stop_check_ids or end + 1 >= seq.max_num_tokens
                        or (deadlines and seq.request.deadline is not None)):
                    self._check_stop(seq, token, now)
            touched.append(seq)
        return touched

    def _check_stop(self, seq: Sequence, token: int, now: float) -> None:
        stopping = seq.request.stopping
        num_tokens = len(seq.token_ids)
        num_output = num_tokens - seq.num_prompt_tokens
        can_stop = num_output > stopping.min_tokens
        if can_stop and not stopping.ignore_eos and token in self.eos_token_ids:
            self._finish(seq, FinishReason.EOS)
            return
        if can_stop and stopping.stop_token_ids and token in stopping.stop_token_ids:
            self._finish(seq, FinishReason.STOP, token)
            return
        if num_output >= stopping.max_tokens or num_tokens >= self.max_model_len:
            self._finish(seq, FinishReason.LENGTH)
            return
        deadline = seq.request.deadline
        if deadline is not None and now >= deadline:
            self._finish(seq, FinishReason.DEADLINE)
