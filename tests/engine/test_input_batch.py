"""The runner's persistent per-request rows: added once, grown by new blocks, dropped when the
scheduler reports the request gone; sampling seeds computed over arrays match the scalar rule."""

from __future__ import annotations

import random

import numpy as np

from tokenrelay_engines.base import SamplingParams
from tokenrelay_engines.scheduler.sequence import ScheduledChunk, SchedulerOutput
from tokenrelay_engines.torch.input_batch import InputBatch, step_seeds
from tokenrelay_engines.torch.runner import ModelRunner
from tokenrelay_engines.torch.sampler import step_seed

from .driver import make_seq
from .helpers import runner_config


def test_vectorised_step_seeds_match_the_scalar_rule() -> None:
    rng = random.Random(7)
    seeds = [0, 1, (1 << 63) - 1, (1 << 64) - 1] + [rng.getrandbits(63) for _ in range(60)]
    steps = [0, 5, 1 << 20, 3] + [rng.randrange(0, 100_000) for _ in range(60)]
    got = step_seeds(np.array(seeds, np.uint64), np.array(steps, np.int64)).tolist()
    assert got == [step_seed(s, k) for s, k in zip(seeds, steps)]


def test_rows_persist_grow_and_leave(tiny_models) -> None:
    runner = ModelRunner(runner_config(tiny_models.path("llama"), block_size=4, num_blocks=32, max_num_seqs=2))
    batch = runner.input_batch
    a = make_seq("a", [5, 6, 7, 8, 9], sampling=SamplingParams(temperature=0.7, top_k=5, logprobs=2), seed=11)
    b = make_seq("b", [3, 4, 5])
    a.block_table, b.block_table = [9, 4], [17]
    out = runner.execute(SchedulerOutput(chunks=[ScheduledChunk(a, 0, 5), ScheduledChunk(b, 0, 3)]))
    assert set(out.token_ids) == {"a", "b"} and set(out.logprobs) == {"a"}
    row_a, row_b = batch.row_of["a"], batch.row_of["b"]
    assert batch.temperature[row_a] == np.float32(0.7) and batch.top_k[row_a] == 5 and batch.logprobs[row_b] == -1
    a.token_ids.append(out.token_ids["a"])
    a.num_computed_tokens = 5
    a.block_table.append(2)  # only the new block is written into the persistent row
    runner.execute(SchedulerOutput(chunks=[ScheduledChunk(a, 5, 1)]))
    assert batch.row_of["a"] == row_a
    assert batch.block_table[row_a, :3].tolist() == [9, 4, 2]
    # b left (finished, aborted or preempted): its row is dropped and reused by the next request
    runner.execute(SchedulerOutput(finished_req_ids=["b"]))
    assert "b" not in batch.row_of and batch.num_rows == 1
    c = make_seq("c", [1, 2])
    c.block_table = [30]
    runner.execute(SchedulerOutput(chunks=[ScheduledChunk(c, 0, 2)]))
    assert batch.row_of["c"] == row_b and batch.block_table[row_b, 0] == 30
    # more live rows than max_num_seqs (a hand-made driver): rows grow rather than fail
    d = make_seq("d", [1, 2, 3])
    d.block_table = [31]
    runner.execute(SchedulerOutput(chunks=[ScheduledChunk(d, 0, 3)]))
    assert batch.num_rows == 3 and set(batch.row_of) == {"a", "c", "d"}


def _expected(seqs, block_size: int) -> dict[str, list]:
    """A decode step's arrays read straight from the sequences: the rule the rows must follow."""
    starts = [s.num_tokens - 1 for s in seqs]
    width = max(starts) // block_size + 1
    return dict(
        input_ids=[s.token_ids[-1] for s in seqs], positions=starts, context_lens=[p + 1 for p in starts],
        slots=[s.block_table[p // block_size] * block_size + p % block_size for s, p in zip(seqs, starts)],
        tables=[s.block_table[:width] + [None] * (width - len(s.block_table[:width])) for s in seqs])


def test_steady_decode_rows_follow_the_sequences() -> None:
    """Decode steps the scheduler vouches for (`decode_continues`) are built from the rows alone:
    positions from the last step's ends, input ids from what was sampled, block tables kept and
    rewritten only where a row gains a block. Staggered lengths cross blocks on different steps,
    and the furthest sequence widens the tables; every array must match the sequences."""
    bs = 4
    batch = InputBatch(max_rows=8, max_blocks_per_seq=4, block_size=bs, eos_token_ids=(0,), vocab_size=100)
    seqs = [make_seq(f"s{i}", list(range(3, 3 + length)), max_tokens=64) for i, length in enumerate((1, 3, 4, 6, 9))]
    free = iter(range(1000, 0, -1))  # block ids out of order: a table is never the identity
    rng = random.Random(3)

    def grow(seq) -> None:
        while len(seq.block_table) * bs < seq.num_tokens:
            seq.block_table.append(next(free))

    for seq in seqs:
        grow(seq)
    step = batch.prepare([ScheduledChunk(s, 0, s.num_tokens) for s in seqs])  # the prompts
    for n_step in range(22):
        sampled = np.array([rng.randrange(1, 100) for _ in seqs], np.int64)
        if n_step != 5:  # one step's tokens go unrecorded: the rows read them from the sequences
            batch.record_sampled(sampled)
        for seq, token in zip(seqs, sampled.tolist()):
            seq.token_ids.append(token)
            grow(seq)
        chunks = [ScheduledChunk(s, s.num_tokens - 1, 1) for s in seqs]
        step = batch.prepare(chunks, decode_continues=n_step > 0)
        want = _expected(seqs, bs)
        assert step.input_ids.tolist() == want["input_ids"], n_step
        assert step.positions.tolist() == want["positions"] and step.context_lens.tolist() == want["context_lens"]
        assert step.context_lens_host == want["context_lens"] and step.decode_only
        assert step.slots.tolist() == want["slots"], n_step
        tables = step.tables.tolist()
        assert [[b for b, w in zip(row, wrow) if w is not None] for row, wrow in zip(tables, want["tables"])] \
            == [[w for w in wrow if w is not None] for wrow in want["tables"]], n_step
        assert step.logits_idx.tolist() == list(range(len(seqs))) and step.sample_request_ids == [s.request_id for s in seqs]
