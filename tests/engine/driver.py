"""A hand-rolled step driver for the runner: block allocation, chunked prefill, decode.

It stands in for the scheduler so runner tests build their SchedulerOutputs by hand and do not
depend on the scheduler's policies.
"""

from __future__ import annotations

from tokenrelay_engines.base import Request, SamplingParams, StoppingCriteria
from tokenrelay_engines.scheduler.sequence import ScheduledChunk, SchedulerOutput, Sequence, SequenceStatus


def make_seq(request_id: str, prompt: list[int], sampling: SamplingParams | None = None,
             max_tokens: int = 8, seed: int = 0, min_tokens: int = 0) -> Sequence:
    req = Request(request_id=request_id, prompt_token_ids=list(prompt),
                  sampling=sampling or SamplingParams(temperature=0.0),
                  stopping=StoppingCriteria(max_tokens=max_tokens, min_tokens=min_tokens, ignore_eos=True))
    return Sequence(request=req, seed=seed)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.free = list(range(num_blocks - 1, -1, -1))  # hand out high ids first: tables are not identity

    def ensure(self, seq: Sequence, num_tokens: int) -> None:
        needed = -(-num_tokens // self.block_size)
        while len(seq.block_table) < needed:
            seq.block_table.append(self.free.pop())

    def release(self, seq: Sequence) -> None:
        self.free.extend(seq.block_table)
        seq.block_table = []


def run_to_completion(runner, seqs: list[Sequence], chunk_size: int = 1 << 30,
                      max_steps: int = 1000) -> dict[str, list]:
    """Prefill (in chunks of at most `chunk_size` tokens) then decode every seq to max_tokens.

    Returns {request_id: [(token_id, TokenLogprob | None), ...]}."""
    pool = BlockPool(runner.num_blocks, runner.block_size)
    results: dict[str, list] = {s.request_id: [] for s in seqs}
    active = list(seqs)
    for s in seqs:
        s.status = SequenceStatus.RUNNING
    for _ in range(max_steps):
        if not active:
            return results
        out = SchedulerOutput()
        for s in active:
            n = min(chunk_size, s.num_tokens - s.num_computed_tokens)
            pool.ensure(s, s.num_computed_tokens + n)
            out.chunks.append(ScheduledChunk(seq=s, start=s.num_computed_tokens, num_new_tokens=n))
        result = runner.execute(out)
        for c in out.chunks:
            s = c.seq
            s.num_computed_tokens = c.end
            if c.sample:
                tok = result.token_ids[s.request_id]
                results[s.request_id].append((tok, result.logprobs.get(s.request_id)))
                s.token_ids.append(tok)
                if s.num_output_tokens >= s.request.stopping.max_tokens:
                    s.status = SequenceStatus.FINISHED
                    pool.release(s)
            else:
                assert s.request_id not in result.token_ids
        active = [s for s in active if not s.is_finished]
    raise AssertionError("driver did not finish within max_steps")
