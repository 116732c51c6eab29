"""The runner's persistent per-request rows (the field's "input batch").

A request gets a row the first time one of its chunks is scheduled and keeps it until the
scheduler reports it finished or preempted (`SchedulerOutput.finished_req_ids`). Its sampling
parameters are written once, when the row is added; its block-table row takes only the blocks
added since the last step. Each step then reads the chunks once (row, start, length, new
tokens) and builds every index array of the batch by gathering rows with numpy.

Nothing here validates: admission (the engine's `_validate`) checks token ids and lengths, the
block manager hands out only block ids of the pool, and the scheduler only schedules chunks
inside a sequence's tokens and blocks.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from tokenrelay_engines.scheduler.sequence import ScheduledChunk, Sequence, SequenceStatus


_SEQ = operator.attrgetter("seq")
_START = operator.attrgetter("start")
_NUM_NEW = operator.attrgetter("num_new_tokens")
_BLOCK_TABLE = operator.attrgetter("block_table")
_TOKEN_IDS = operator.attrgetter("token_ids")


def step_seeds(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """`sampler.step_seed` over arrays (uint64 arithmetic wraps mod 2^64 as the scalar one masks)."""
    with np.errstate(over="ignore"):
        z = seeds + (steps.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclass(slots=True)
class StepInputs:
    """One step's host arrays (numpy), ready to pack and copy to the device."""

    input_ids: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    tables: np.ndarray  # [chunks, max blocks this step]
    context_lens: np.ndarray  # chunk ends
    cu_seqlens_q: np.ndarray
    decode_idx: np.ndarray
    logits_idx: np.ndarray
    query_lens: list[int]
    decode_only: bool  # every query length is 1
    context_lens_host: list[int]
    sample_rows: np.ndarray  # input-batch rows of the chunks that sample, in chunk order
    sample_ends: np.ndarray  # their ends (= their sequences' lengths)
    sample_chunks: list[ScheduledChunk]
    sample_request_ids: list[str] | None = None  # their request ids, when known already


@dataclass(slots=True, eq=False)
class _Steady:
    """The previous step, when it was pure decode (every chunk one token, every chunk sampled):
    if the next step schedules the same sequences, each one token further, its rows, request ids
    and index arrays follow from this one without reading the chunks again."""

    seqs: list[Sequence]
    rows: np.ndarray
    ends: np.ndarray
    ends_host: list[int]
    request_ids: list[str]
    # the step's block tables ([seqs, blocks it reached]) and, per sequence, the positions its
    # written blocks cover: kept from step to step, rewritten only where a row gains a block
    tables: np.ndarray
    room: np.ndarray
    # the ids the runner sampled for them (`record_sampled`): the next step's input ids, as whoever
    # drives the runner appends them to the sequences; None until recorded
    sampled: np.ndarray | None = None


class InputBatch:
    def __init__(self, max_rows: int, max_blocks_per_seq: int, block_size: int,
                 eos_token_ids: tuple[int, ...], vocab_size: int) -> None:
        self.block_size = block_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.vocab_size = vocab_size
        self.row_of: dict[str, int] = {}  # request id -> row
        self._row_of_seq: dict[Sequence, int] = {}  # the same rows by sequence (identity-hashed)
        self.seqs: list[Sequence | None] = []
        self._free: list[int] = []
        self._num_blocks: list[int] = []  # block ids written into each row
        self._num_blocks_a = np.zeros(0, np.int64)  # the same, as an array (steady decode steps)
        self._steady: _Steady | None = None
        self._aranges: dict[int, np.ndarray] = {}  # n -> arange(n + 1), shared by steps (never written)
        self.block_table = np.zeros((0, max(1, max_blocks_per_seq)), np.int64)
        self.temperature = np.zeros(0, np.float32)
        self.top_k = np.zeros(0, np.int64)
        self.top_p = np.zeros(0, np.float32)
        self.min_p = np.zeros(0, np.float32)
        self.repetition_penalty = np.zeros(0, np.float32)
        self.presence_penalty = np.zeros(0, np.float32)
        self.frequency_penalty = np.zeros(0, np.float32)
        self.logprobs = np.zeros(0, np.int64)  # -1: none
        self.seed = np.zeros(0, np.uint64)
        self.num_prompt_tokens = np.zeros(0, np.int64)
        # rows whose sampling needs per-step Python work (penalties over their tokens, min_tokens)
        self.special: set[int] = set()
        # rows that draw (temperature > 0), want logprobs, or are special: none -> all greedy
        self.nonplain: set[int] = set()
        self._grow_rows(max(1, max_rows))

    # ---- rows ------------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return len(self.row_of)

    def _grow_rows(self, new_size: int) -> None:
        old = len(self.seqs)
        for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty", "logprobs", "seed", "num_prompt_tokens"):
            arr = getattr(self, name)
            grown = np.zeros(new_size, arr.dtype)
            grown[:old] = arr
            setattr(self, name, grown)
        grown_blocks = np.zeros(new_size, np.int64)
        grown_blocks[:old] = self._num_blocks_a
        self._num_blocks_a = grown_blocks
        table = np.zeros((new_size, self.block_table.shape[1]), np.int64)
        table[:old] = self.block_table
        self.block_table = table
        self.seqs.extend([None] * (new_size - old))
        self._num_blocks.extend([0] * (new_size - old))
        self._free.extend(range(new_size - 1, old - 1, -1))

    def remove(self, request_ids) -> None:
        for rid in request_ids:
            row = self.row_of.pop(rid, None)
            if row is not None:
                self._release(row)
                self._steady = None

    def _release(self, row: int) -> None:
        seq = self.seqs[row]
        if seq is not None:
            self._row_of_seq.pop(seq, None)
        self.seqs[row] = None
        self._num_blocks[row] = 0
        self._num_blocks_a[row] = 0
        self.special.discard(row)
        self.nonplain.discard(row)
        self._free.append(row)

    def _take_row(self) -> int:
        if not self._free:  # rows of sequences finished without being reported (a hand-made driver)
            for rid, row in list(self.row_of.items()):
                seq = self.seqs[row]
                if seq is None or seq.status is SequenceStatus.FINISHED:
                    del self.row_of[rid]
                    self._release(row)
        if not self._free:
            self._grow_rows(2 * len(self.seqs))
        return self._free.pop()

    def add(self, seq: Sequence) -> int:
        """A fresh row for `seq` (replacing any row its request id held)."""
        self._steady = None
        rid = seq.request_id
        old = self.row_of.pop(rid, None)
        if old is not None:
            self._release(old)
        row = self._take_row()
        self.row_of[rid] = row
        self._row_of_seq[seq] = row
        self.seqs[row] = seq
        sp, stopping = seq.request.sampling, seq.request.stopping
        self.temperature[row] = sp.temperature
        self.top_k[row] = sp.top_k
        self.top_p[row] = sp.top_p
        self.min_p[row] = sp.min_p
        self.repetition_penalty[row] = sp.repetition_penalty
        self.presence_penalty[row] = sp.presence_penalty
        self.frequency_penalty[row] = sp.frequency_penalty
        self.logprobs[row] = -1 if sp.logprobs is None else sp.logprobs
        self.seed[row] = seq.seed
        self.num_prompt_tokens[row] = seq.num_prompt_tokens
        if (sp.repetition_penalty != 1.0 or sp.presence_penalty or sp.frequency_penalty
                or stopping.min_tokens > 0):
            self.special.add(row)
        if row in self.special or sp.temperature != 0 or sp.logprobs is not None:
            self.nonplain.add(row)
        self._num_blocks[row] = 0
        self._num_blocks_a[row] = 0
        self._write_blocks(row, seq.block_table)
        return row

    def _write_blocks(self, row: int, table: list[int]) -> None:
        have, want = self._num_blocks[row], len(table)
        if want > self.block_table.shape[1]:
            grown = np.zeros((self.block_table.shape[0], max(want, 2 * self.block_table.shape[1])), np.int64)
            grown[:, :self.block_table.shape[1]] = self.block_table
            self.block_table = grown
        if want == have + 1:  # the common case: one block added since the last step
            self.block_table[row, have] = table[have]
        else:
            if want < have:  # the table was replaced (only a hand-made driver does this): rewrite it
                have = 0
            self.block_table[row, have:want] = table[have:want]
        self._num_blocks[row] = want
        self._num_blocks_a[row] = want

    # ---- one step ----------------------------------------------------------------------------

    def prepare(self, chunks: list[ScheduledChunk], decode_continues: bool = False) -> StepInputs:
        """Every index array of the step, from the chunks' rows, starts, lengths and new tokens.
        `decode_continues`: the scheduler vouches that the chunks are the last step's sequences,
        each one token further (`SchedulerOutput.decode_continues`)."""
        steady, self._steady = self._steady, None
        n = len(chunks)
        if decode_continues and steady is not None and n == len(steady.seqs):
            return self._prepare_steady(chunks, steady)
        # Column by column (map over C-level getters, and numpy): no per-chunk Python loop on the
        # common path.
        row_of_seq, num_blocks = self._row_of_seq, self._num_blocks
        seqs = list(map(_SEQ, chunks))
        starts = list(map(_START, chunks))
        lens = list(map(_NUM_NEW, chunks))
        # `==` on lists compares in C (sequences by identity): the same sequences, each one token further
        if steady is not None and lens.count(1) == n and starts == steady.ends_host and seqs == steady.seqs:
            return self._prepare_steady(chunks, steady)
        rows = list(map(row_of_seq.get, seqs))
        if None in rows:  # requests joining the batch
            rows = [self.add(seq) if row is None else row for seq, row in zip(seqs, rows)]
        lengths = list(map(len, map(_BLOCK_TABLE, seqs)))
        if lengths != list(map(num_blocks.__getitem__, rows)):  # blocks added since the last step
            for seq, row, length in zip(seqs, rows, lengths):
                if length != num_blocks[row]:
                    self._write_blocks(row, seq.block_table)
        token_lists = list(map(_TOKEN_IDS, seqs))
        all_single = lens.count(1) == n
        if all_single:
            ids = list(map(operator.getitem, token_lists, starts))
        else:
            ids = []
            for tokens, start, length in zip(token_lists, starts, lens):
                ids.extend(tokens[start:start + length])
        bs = self.block_size
        rows_a = np.array(rows, np.int64)
        starts_a = np.array(starts, np.int64)
        ends = starts_a + (1 if all_single else np.array(lens, np.int64))
        sample_a = np.nonzero(ends == np.array(list(map(len, token_lists)), np.int64))[0]
        max_blocks = int(-(-int(ends.max()) // bs))
        tables = self.block_table[rows_a, :max_blocks]
        cu = np.arange(n + 1, dtype=np.int64) if all_single else np.zeros(n + 1, np.int64)
        if all_single:
            positions = starts_a
            token_rows = np.arange(n)
        else:
            q = ends - starts_a
            np.cumsum(q, out=cu[1:])
            token_rows = np.repeat(np.arange(n), q)
            positions = np.arange(cu[-1], dtype=np.int64) - np.repeat(cu[:-1] - starts_a, q)
        slots = tables[token_rows, positions // bs] * bs + positions % bs
        request_ids = None
        ends_host = ends.tolist()
        if all_single and len(sample_a) == n:  # pure decode: the next step may follow from this one
            request_ids = [seq.request_id for seq in seqs]
            self._steady = _Steady(seqs, rows_a, ends, ends_host, request_ids, tables,
                                   self._num_blocks_a[rows_a] * bs)
        return StepInputs(
            input_ids=np.array(ids, np.int64), positions=positions, slots=slots, tables=tables,
            context_lens=ends, cu_seqlens_q=cu,
            decode_idx=np.arange(n, dtype=np.int64) if all_single else np.nonzero(cu[1:] - cu[:-1] == 1)[0],
            logits_idx=cu[1:][sample_a] - 1,
            query_lens=[1] * n if all_single else lens, decode_only=all_single,
            context_lens_host=ends_host,
            sample_rows=rows_a[sample_a], sample_ends=ends[sample_a],
            sample_chunks=chunks if len(sample_a) == n else [chunks[i] for i in sample_a.tolist()],
            sample_request_ids=request_ids)

    def _prepare_steady(self, chunks: list[ScheduledChunk], steady: _Steady) -> StepInputs:
        """`prepare` for a decode step that follows a pure decode step over the same sequences:
        every chunk is one token at the end of its sequence (the token sampled last step), so it
        samples; the rows, request ids and block tables are the previous step's, the positions its
        ends, the input ids what it sampled. Only rows that cross into a block they have not
        written yet read their sequence's block table (and rewrite their row of the tables)."""
        n, bs, seqs = len(chunks), self.block_size, steady.seqs
        rows_a, positions, tables, room = steady.rows, steady.ends, steady.tables, steady.room
        ends = positions + 1
        width = max(steady.ends_host) // bs + 1  # blocks the furthest sequence reaches
        cross = np.flatnonzero(positions >= room)
        if len(cross):
            num_blocks, grows = self._num_blocks, width != tables.shape[1]
            for i, row in zip(cross.tolist(), rows_a[cross].tolist()):
                self._write_blocks(row, seqs[i].block_table)
                room[i] = num_blocks[row] * bs
                if not grows:
                    tables[i] = self.block_table[row, :width]
        if width != tables.shape[1]:
            tables = self.block_table[rows_a, :width]
        ids = steady.sampled
        if ids is None:  # the last step's tokens were not recorded: read them from the sequences
            ids = np.array(list(map(operator.getitem, map(_TOKEN_IDS, seqs), steady.ends_host)), np.int64)
        cu = self._aranges.get(n)
        if cu is None:
            cu = self._aranges[n] = np.arange(n + 1, dtype=np.int64)
        slots = tables[cu[:-1], positions // bs] * bs + positions % bs
        ends_host = ends.tolist()
        self._steady = _Steady(seqs, rows_a, ends, ends_host, steady.request_ids, tables, room)
        return StepInputs(
            input_ids=ids, positions=positions, slots=slots, tables=tables,
            context_lens=ends, cu_seqlens_q=cu, decode_idx=cu[:-1], logits_idx=cu[:-1],
            query_lens=[1] * n, decode_only=True, context_lens_host=ends_host,
            sample_rows=rows_a, sample_ends=ends, sample_chunks=chunks, sample_request_ids=steady.request_ids)

    def record_sampled(self, token_ids: np.ndarray) -> None:
        """The ids this step sampled, in sampling-chunk order (the runner calls this once per step
        that sampled): after a pure decode step they are the next step's input ids."""
        if self._steady is not None:
            self._steady.sampled = token_ids

    def sampling_arrays(self, inputs: StepInputs) -> dict[str, np.ndarray]:
        """Per-row sampling parameters of the sampling chunks, plus the (row, token) pairs of the
        rows that need them (penalties over their tokens, tokens banned below min_tokens)."""
        rows = inputs.sample_rows
        out = {name: getattr(self, name)[rows] for name in (
            "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "logprobs")}
        seen_rows, seen_tokens, out_rows, out_tokens, ban_rows, ban_tokens = [], [], [], [], [], []
        if self.special:
            for i, c in enumerate(inputs.sample_chunks):
                if int(rows[i]) not in self.special:
                    continue
                seq = c.seq
                sp, stopping = seq.request.sampling, seq.request.stopping
                if sp.repetition_penalty != 1.0:
                    uniq = sorted(set(seq.token_ids))
                    seen_rows += [i] * len(uniq)
                    seen_tokens += uniq
                if sp.presence_penalty or sp.frequency_penalty:
                    tokens = seq.output_token_ids
                    out_rows += [i] * len(tokens)
                    out_tokens += tokens
                if seq.num_output_tokens < stopping.min_tokens:
                    banned = set(stopping.stop_token_ids)
                    if not stopping.ignore_eos:
                        banned.update(self.eos_token_ids)
                    banned = sorted(t for t in banned if 0 <= t < self.vocab_size)
                    ban_rows += [i] * len(banned)
                    ban_tokens += banned
        for name, values in (("seen_rows", seen_rows), ("seen_tokens", seen_tokens), ("out_rows", out_rows),
                             ("out_tokens", out_tokens), ("ban_rows", ban_rows), ("ban_tokens", ban_tokens)):
            out[name] = np.array(values, np.int64)
        return out

    def step_seeds(self, inputs: StepInputs) -> list[int]:
        """Each sampling row's seed for this step (its number of output tokens so far)."""
        rows = inputs.sample_rows
        return step_seeds(self.seed[rows], inputs.sample_ends - self.num_prompt_tokens[rows]).tolist()
