"""BlockManager: allocation, append, free, reference counts."""

from __future__ import annotations

import pytest

from tokenrelay_engines.base import Request
from tokenrelay_engines.scheduler.block_manager import BlockManager, OutOfBlocks
from tokenrelay_engines.scheduler.sequence import Sequence


def _seq(rid: str = "r", prompt_len: int = 5) -> Sequence:
    return Sequence(Request(rid, list(range(1, prompt_len + 1))), seed=0)


def test_allocate_covers_tokens_and_free_returns_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = _seq(prompt_len=5)
    assert bm.can_allocate(seq, 5)
    bm.allocate(seq, 5)
    assert len(seq.block_table) == 2
    assert bm.num_used_blocks == 2 and bm.num_free_blocks == 2
    assert all(bm.ref_counts[b] == 1 for b in seq.block_table)
    bm.allocate(seq, 8)  # still inside the second block
    assert len(seq.block_table) == 2
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 4 and bm.num_used_blocks == 0
    assert bm.ref_counts == [0, 0, 0, 0]
    bm.free(seq)  # idempotent
    assert bm.num_free_blocks == 4


def test_can_allocate_edges() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    seq = _seq()
    assert bm.can_allocate(seq, 0)
    assert bm.can_allocate(seq, 8)
    assert not bm.can_allocate(seq, 9)
    with pytest.raises(OutOfBlocks):
        bm.allocate(seq, 9)
    assert bm.num_free_blocks == 2 and seq.block_table == []  # a failed allocate takes nothing
    bm.allocate(seq, 8)
    assert bm.can_allocate(seq, 8) and not bm.can_allocate(seq, 9)
    assert bm.capacity(seq) == 8


def test_empty_pool() -> None:
    bm = BlockManager(num_blocks=0, block_size=16)
    seq = _seq()
    assert not bm.can_allocate(seq, 1)
    assert bm.can_allocate(seq, 0)


def test_append_grows_only_at_block_boundaries() -> None:
    bm = BlockManager(num_blocks=3, block_size=4)
    seq = _seq(prompt_len=4)
    bm.allocate(seq, 4)
    assert len(seq.block_table) == 1
    seq.token_ids.append(9)  # 5 tokens: the decode step needs a second block
    assert bm.can_append(seq)
    bm.append(seq)
    assert len(seq.block_table) == 2
    for _ in range(3):
        seq.token_ids.append(9)
        bm.append(seq)
    assert len(seq.block_table) == 2  # 8 tokens
    seq.token_ids.append(9)
    bm.append(seq)
    assert len(seq.block_table) == 3
    seq.token_ids.append(9)
    assert bm.can_append(seq)  # 10 tokens still fit in 3 blocks
    seq.token_ids.extend([9, 9, 9])
    assert not bm.can_append(seq)


def test_shared_blocks_are_freed_by_last_holder() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = _seq("a", 8), _seq("b", 8)
    bm.allocate(a, 8)
    bm.share(b, a.block_table[:1])
    assert bm.ref_counts[a.block_table[0]] == 2
    bm.allocate(b, 8)
    assert bm.num_used_blocks == 3
    shared = a.block_table[0]
    bm.free(a)
    assert bm.ref_counts[shared] == 1 and shared not in bm.free_block_ids
    assert bm.num_used_blocks == 2
    bm.free(b)
    assert bm.num_used_blocks == 0 and sorted(bm.free_block_ids) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        bm.share(b, [shared])  # free blocks cannot be shared


def test_distinct_sequences_get_distinct_blocks() -> None:
    bm = BlockManager(num_blocks=6, block_size=2)
    seqs = [_seq(str(i), 4) for i in range(3)]
    for s in seqs:
        bm.allocate(s, 4)
    held = [b for s in seqs for b in s.block_table]
    assert sorted(held) == list(range(6))
    assert not bm.can_allocate(_seq("x"), 1)
