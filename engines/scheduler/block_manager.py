"""Paged KV block accounting: which blocks of the pool each sequence holds.

Plain ints and lists, no tensors. A block's reference count says how many sequences hold it;
a block goes back to the free list only when its last holder frees it.

Prefix caching (optional): once a full block of a prompt has been computed, it is registered
under a digest of the whole prefix up to its end (the parent's digest + its token ids). A later
sequence whose prompt starts with the same tokens shares those blocks instead of recomputing
them. A freed registered block keeps its contents and its registration while it sits in the
free list (least recently freed reused first) until it is handed out for something else.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass

from tokenrelay_engines.scheduler.sequence import Sequence


class OutOfBlocks(RuntimeError):
    """An allocation was asked for that the free list cannot cover (check can_allocate first)."""


@dataclass(slots=True)
class _PrefixProgress:
    """How far a sequence's prompt blocks are registered in the prefix cache."""

    num_blocks: int = 0
    digest: bytes = b""


def _block_digest(parent: bytes, token_ids: list[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(t.to_bytes(8, "little", signed=True) for t in token_ids))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 0:
            raise ValueError("num_blocks must be >= 0")
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts: list[int] = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self._block_digest: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # prefix digest -> block id holding that block
        self._progress: dict[str, _PrefixProgress] = {}  # request id -> registration progress

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still lacks to cover `num_tokens` tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def capacity(self, seq: Sequence) -> int:
        """Most tokens `seq` could cover with its blocks plus every free block."""
        return (len(seq.block_table) + len(self.free_block_ids)) * self.block_size

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_new_blocks(seq, num_tokens) <= len(self.free_block_ids)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` until it covers `num_tokens` tokens."""
        needed = self.num_new_blocks(seq, num_tokens)
        if needed > len(self.free_block_ids):
            raise OutOfBlocks(f"{seq.request_id}: needs {needed} blocks, {self.num_free_blocks} free")
        for _ in range(needed):
            block_id = self.free_block_ids.popleft()
            digest = self._block_digest[block_id]
            if digest is not None:  # evict the cached contents it held
                if self._cached.get(digest) == block_id:
                    del self._cached[digest]
                self._block_digest[block_id] = None
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)

    def can_append(self, seq: Sequence) -> bool:
        """Whether the next decode step (covering all of seq.token_ids) fits."""
        return self.can_allocate(seq, seq.num_tokens)

    def append(self, seq: Sequence) -> None:
        self.allocate(seq, seq.num_tokens)

    def share(self, seq: Sequence, block_ids: list[int]) -> None:
        """Append blocks another sequence already holds (prefix sharing)."""
        for block_id in block_ids:
            if self.ref_counts[block_id] < 1:
                raise ValueError(f"block {block_id} is free; only held blocks can be shared")
            self.ref_counts[block_id] += 1
            seq.block_table.append(block_id)

    # ---- prefix caching ----------------------------------------------------------------

    def allocate_prefix(self, seq: Sequence) -> int:
        """Share the cached blocks of `seq`'s prompt prefix; returns the tokens they cover.

        Only for a sequence holding no blocks. At least one token is always left to compute
        (its logits give the next token), so a shared block is never written to.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        bs = self.block_size
        limit = min(seq.num_prompt_tokens, seq.num_tokens - 1) // bs
        digest = b""
        for i in range(limit):
            digest = _block_digest(digest, seq.token_ids[i * bs:(i + 1) * bs])
            block_id = self._cached.get(digest)
            if block_id is None:
                break
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.remove(block_id)
            self.ref_counts[block_id] += 1
            seq.block_table.append(block_id)
        return len(seq.block_table) * bs

    def register_prefix(self, seq: Sequence) -> None:
        """Register the full prompt blocks of `seq` whose KV is computed by now."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens, seq.num_prompt_tokens) // bs
        progress = self._progress.setdefault(seq.request_id, _PrefixProgress())
        for i in range(progress.num_blocks, min(full, len(seq.block_table))):
            progress.digest = _block_digest(progress.digest, seq.token_ids[i * bs:(i + 1) * bs])
            progress.num_blocks = i + 1
            block_id = seq.block_table[i]
            if progress.digest not in self._cached and self._block_digest[block_id] is None:
                self._cached[progress.digest] = block_id
                self._block_digest[block_id] = progress.digest

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def free(self, seq: Sequence) -> None:
        """Release every block `seq` holds. Idempotent."""
        self._progress.pop(seq.request_id, None)
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] < 0:
                raise RuntimeError(f"block {block_id} freed more often than held")
            if self.ref_counts[block_id] == 0:
                self.free_block_ids.append(block_id)
        seq.block_table.clear()
