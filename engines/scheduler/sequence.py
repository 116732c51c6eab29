"""A request's state inside the scheduler, and what one step schedules and returns.

These types are the seam between the scheduler (plain ints and lists) and the runner
(tensors): the scheduler hands the runner a `SchedulerOutput`, the runner answers with a
`RunnerOutput`, and the scheduler folds that back into its sequences.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import msgspec

from tokenrelay_engines.base import FinishReason, Request, TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_FINISHED = SequenceStatus.FINISHED  # an enum member read through its class costs ~0.3 us (3.11)


@dataclass(slots=True, eq=False)
class Sequence:
    """One request's tokens and KV blocks. Output tokens are appended to `token_ids`."""

    request: Request
    seed: int  # resolved seed: the request's, or one the engine picked
    token_ids: list[int] = field(default_factory=list)
    num_prompt_tokens: int = 0
    # Tokens whose KV is in the cache. After preemption it drops to 0 and the whole of
    # token_ids (prompt + output so far) is recomputed as a prompt.
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served from shared prefix blocks
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0
    # Set by the scheduler when the sequence is added, so the per-token stop check reads only
    # these: the token count that ends it with LENGTH, and the ids that may end it (eos unless
    # ignored, and its stop token ids). A token outside both needs no other check.
    max_num_tokens: int = 0
    stop_check_ids: frozenset[int] = frozenset()
    request_id: str = field(init=False)  # the request's, read once

    def __post_init__(self) -> None:
        self.request_id = self.request.request_id
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is _FINISHED


class ScheduledChunk(msgspec.Struct):
    """Compute KV for token_ids[start:start + num_new_tokens] of `seq` this step.

    When the chunk reaches the end of the sequence (`sample`), the runner samples the next
    token from the logits of its last position. (A msgspec Struct rather than a dataclass:
    the scheduler builds one per running sequence per step, and a Struct is built in C, in a
    third of the time.)
    """

    seq: Sequence
    start: int
    num_new_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def sample(self) -> bool:
        return self.end == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """One step's batch: prefill chunks and decode tokens, flattened by the runner."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Finished while scheduling (LENGTH: too long for the whole KV pool); not in `chunks`.
    finished: list[Sequence] = field(default_factory=list)
    # Requests that left the running batch (finished, aborted or preempted) since the last
    # non-empty step: the runner drops their persistent rows before preparing this step.
    finished_req_ids: list[str] = field(default_factory=list)
    # Steady decode: this step and the last non-empty one each scheduled one decode token for
    # every running sequence, and nothing joined, left or was preempted in between, so the
    # chunks are the last step's sequences, in the same order, each one token further (the
    # runner then builds the step from its persistent rows without reading the chunks).
    decode_continues: bool = False

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(slots=True)
class RunnerOutput:
    """Sampled tokens for every chunk with `sample` set, keyed by request id."""

    token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
