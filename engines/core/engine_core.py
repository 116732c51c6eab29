"""The engine core: scheduler, block manager and runner, and nothing else.

One `step()`: finish expired requests -> schedule() -> runner.execute(batch) -> update() ->
one `StepOutputs`, column by column: the ids of the requests that sampled and their new
tokens, taken whole from the runner's answer (the core publishes every step, so what a
request sampled this step is all that is new), and, sparsely, logprobs, first tokens and
finished requests. No object is built per request per step.
Text, stop strings, seeds and output slots belong to the front end (`output_processor.py`).
The same class runs on the in-process engine's thread and in the engine-core process.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from tokenrelay_engines.base import EngineStats, FinishReason, ModelInfo, Request
from tokenrelay_engines.config import SchedulerConfig
from tokenrelay_engines.core.messages import FinishedRequest, StartedRequest, StepOutputs
from tokenrelay_engines.core.validation import EngineLimits
from tokenrelay_engines.scheduler.block_manager import BlockManager
from tokenrelay_engines.scheduler.scheduler import Scheduler
from tokenrelay_engines.scheduler.sequence import RunnerOutput, Sequence, SequenceStatus


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
        self._held: dict[str, Sequence] = {}  # every request not finished yet, by id
        self._unstarted: dict[str, Sequence] = {}  # held, no output token yet
        self.stalled = False  # the last step scheduled nothing: wait for input or a deadline

    # ---- commands ------------------------------------------------------------------------

    def add(self, request: Request) -> StepOutputs:
        """Queue a validated request (seed resolved). Returns its final output if it can never run."""
        assert request.sampling.seed is not None, "the front end resolves the seed"
        seq = Sequence(request, request.sampling.seed)
        rid = request.request_id
        self._held[rid] = seq
        self._unstarted[rid] = seq
        self.scheduler.add(seq)
        self.stalled = False
        return StepOutputs(finished=self._finished([seq])) if seq.is_finished else StepOutputs()

    def abort(self, request_ids: list[str]) -> StepOutputs:
        """Finish each held request with CANCELLED (its final output); unknown ids are ignored."""
        seqs = [seq for rid in request_ids if (seq := self.scheduler.abort(rid)) is not None]
        return StepOutputs(finished=self._finished(seqs))

    # ---- one step ------------------------------------------------------------------------

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def next_deadline(self) -> float | None:
        return self.scheduler.next_deadline()

    def step(self) -> StepOutputs:
        """One engine step: what it sampled, and which requests it finished."""
        sched = self.scheduler
        ended = sched.finish_expired(time.monotonic())
        out = sched.schedule()
        ended.extend(out.finished)
        self.stalled = out.is_empty and not out.preempted and not out.finished
        if out.is_empty:
            return StepOutputs(finished=self._finished(ended))
        runner_out = self.runner.execute(out)
        touched = sched.update(out, runner_out)
        finished = SequenceStatus.FINISHED
        ended.extend([seq for seq in touched if seq.status is finished])
        return self._outputs(runner_out, ended)

    def _outputs(self, runner_out: RunnerOutput, ended: list[Sequence]) -> StepOutputs:
        # update() appended every sampled token (nothing can finish a request between
        # schedule() and update() on the core's one thread), so the runner's answer is the delta.
        sampled = runner_out.token_ids
        step = StepOutputs(list(sampled), list(sampled.values()))
        if runner_out.logprobs:
            step.logprobs = {rid: (lp.logprob, list(lp.top)) for rid, lp in runner_out.logprobs.items()}
        unstarted = self._unstarted
        if unstarted:  # whichever is shorter: the requests not started yet, or this step's
            if len(unstarted) <= len(sampled):
                started = [seq for rid, seq in unstarted.items() if rid in sampled]
            else:
                started = [seq for rid in sampled if (seq := unstarted.get(rid)) is not None]
            if started:
                step.started = [StartedRequest(seq.request_id, seq.num_cached_tokens, seq.first_scheduled_time,
                                               seq.first_token_time) for seq in started]
                for seq in started:
                    del self._unstarted[seq.request_id]
        if ended:
            step.finished = self._finished(ended)
        return step

    def _finished(self, seqs: list[Sequence]) -> list[FinishedRequest]:
        """Final records for `seqs` (each once: the core forgets them here)."""
        records = []
        for seq in seqs:
            rid = seq.request_id
            if self._held.get(rid) is not seq:
                continue
            del self._held[rid]
            self._unstarted.pop(rid, None)
            stop_token = seq.stop_reason if (seq.finish_reason is FinishReason.STOP
                                             and isinstance(seq.stop_reason, int)) else None
            records.append(FinishedRequest(rid, seq.finish_reason, stop_token, seq.num_cached_tokens,
                                           seq.first_scheduled_time, seq.first_token_time))
        return records

    # ---- state ---------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        sched, bm = self.scheduler, self.block_manager
        return EngineStats(sched.num_running, sched.num_waiting, bm.num_used_blocks, bm.num_blocks,
                           num_preemptions=sched.num_preemptions)

    def held_with_prefix(self, prefix: str) -> list[str]:
        return [rid for rid in self._held if rid.startswith(prefix)]

    def abort_all(self) -> StepOutputs:
        return self.abort(list(self._held))

    def free_all(self) -> None:
        """The loop failed: drop every request without outputs (the front end reports the error)."""
        for seq in self._held.values():
            try:
                self.block_manager.free(seq)
            except Exception:  # noqa: BLE001 - the pool is abandoned anyway
                pass
        self._held.clear()
        self._unstarted.clear()
