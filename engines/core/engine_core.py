"""The engine core: scheduler, block manager and runner, and nothing else.

One `step()`: finish expired requests -> schedule() -> runner.execute(batch) -> update() ->
one `RequestUpdate` per request touched, holding only what is new since its previous update.
Text, stop strings, seeds and output slots belong to the front end (`output_processor.py`).
The same class runs on the in-process engine's thread and in the engine-core process.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from tokenrelay_engines.base import EngineStats, FinishReason, ModelInfo, Request
from tokenrelay_engines.config import SchedulerConfig
from tokenrelay_engines.core.messages import RequestUpdate
from tokenrelay_engines.core.validation import EngineLimits
from tokenrelay_engines.scheduler.block_manager import BlockManager
from tokenrelay_engines.scheduler.scheduler import Scheduler
from tokenrelay_engines.scheduler.sequence import Sequence


@dataclasses.dataclass(slots=True, eq=False)
class _Held:
    seq: Sequence
    num_sent: int = 0  # output tokens already in an update
    want_logprobs: bool = False


class EngineCore:
    def __init__(self, runner: Any, config: SchedulerConfig) -> None:
        self.runner = runner
        model_info: ModelInfo = runner.model_info
        max_len = model_info.context_length
        if config.max_model_len:
            max_len = min(max_len, config.max_model_len)
        self.model_info = dataclasses.replace(model_info, context_length=max_len)
        self.block_manager = BlockManager(runner.num_blocks, runner.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager, model_info.eos_token_ids, max_len)
        self.limits = EngineLimits(self.model_info, self.block_manager.num_blocks, runner.block_size)
        self._held: dict[str, _Held] = {}
        self.stalled = False  # the last step scheduled nothing: wait for input or a deadline

    # ---- commands ------------------------------------------------------------------------

    def add(self, request: Request) -> list[RequestUpdate]:
        """Queue a validated request (seed resolved). Returns its final update if it can never run."""
        assert request.sampling.seed is not None, "the front end resolves the seed"
        seq = Sequence(request, request.sampling.seed)
        self._held[request.request_id] = _Held(seq, want_logprobs=request.sampling.logprobs is not None)
        self.scheduler.add(seq)
        self.stalled = False
        return self._updates([seq]) if seq.is_finished else []

    def abort(self, request_ids: list[str]) -> list[RequestUpdate]:
        """Finish each held request with CANCELLED (its final update); unknown ids are ignored."""
        seqs = [seq for rid in request_ids if (seq := self.scheduler.abort(rid)) is not None]
        return self._updates(seqs)

    # ---- one step ------------------------------------------------------------------------

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def next_deadline(self) -> float | None:
        return self.scheduler.next_deadline()

    def step(self) -> tuple[list[RequestUpdate], int]:
        """One engine step; returns the updates and the number of tokens sampled."""
        sched = self.scheduler
        touched = sched.finish_expired(time.monotonic())
        out = sched.schedule()
        touched.extend(out.finished)
        self.stalled = out.is_empty and not out.preempted and not out.finished
        num_sampled = 0
        if not out.is_empty:
            runner_out = self.runner.execute(out)
            touched.extend(sched.update(out, runner_out))
            num_sampled = len(runner_out.token_ids)
        return self._updates(touched), num_sampled

    def _updates(self, seqs: list[Sequence]) -> list[RequestUpdate]:
        updates = []
        for seq in seqs:
            held = self._held.get(seq.request_id)
            if held is None or held.seq is not seq:
                continue
            update = self._delta(held)
            if update is not None:
                updates.append(update)
            if seq.is_finished:
                del self._held[seq.request_id]
        return updates

    @staticmethod
    def _delta(held: _Held) -> RequestUpdate | None:
        """What is new since the previous update: slices from the sent offset, never the whole output."""
        seq = held.seq
        start = held.num_sent
        new_ids = seq.token_ids[seq.num_prompt_tokens + start:]
        finished = seq.is_finished
        if not new_ids and not finished:
            return None
        held.num_sent = start + len(new_ids)
        update = RequestUpdate(seq.request_id, new_ids)
        if held.want_logprobs:
            update.logprobs = [(lp.token_id, lp.logprob, list(lp.top)) for lp in seq.output_logprobs[start:]]
        if start == 0 or finished:  # the first delta and the last carry the timings
            update.num_cached_tokens = seq.num_cached_tokens
            update.first_scheduled_time = seq.first_scheduled_time
            update.first_token_time = seq.first_token_time
        if finished:
            update.finish_reason = seq.finish_reason
            if seq.finish_reason is FinishReason.STOP and isinstance(seq.stop_reason, int):
                update.stop_token_id = seq.stop_reason
        return update

    # ---- state ---------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        sched, bm = self.scheduler, self.block_manager
        return EngineStats(sched.num_running, sched.num_waiting, bm.num_used_blocks, bm.num_blocks,
                           num_preemptions=sched.num_preemptions)

    def abort_all(self) -> list[RequestUpdate]:
        return self.abort(list(self._held))

    def free_all(self) -> None:
        """The loop failed: drop every request without updates (the front end reports the error)."""
        for held in self._held.values():
            try:
                self.block_manager.free(held.seq)
            except Exception:  # noqa: BLE001 - the pool is abandoned anyway
                pass
        self._held.clear()
