"""Random attention batches over a paged KV cache, for comparing attention backends."""

from __future__ import annotations

import random

import torch

from tokenrelay_engines.torch.attention import AttentionMetadata


def make_batch(seqs: list[tuple[int, int]], *, block_size: int, heads: int, kv_heads: int, head_dim: int,
               seed: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """seqs: (query_len, context_len) per sequence. A random cache, random block tables, random queries."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    need = [-(-ctx // block_size) for _, ctx in seqs]
    num_blocks = sum(need) + 3
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables = torch.zeros(len(seqs), max(need), dtype=torch.int64)
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(pool[at:at + n])
        at += n
    kv = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen)
    total = sum(q for q, _ in seqs)
    query = torch.randn(total, heads, head_dim, generator=gen)
    cu = [0]
    positions, slots = [], []
    for i, (q_len, ctx) in enumerate(seqs):
        cu.append(cu[-1] + q_len)
        for pos in range(ctx - q_len, ctx):
            positions.append(pos)
            slots.append(int(tables[i, pos // block_size]) * block_size + pos % block_size)
    to = lambda x: torch.as_tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    meta = AttentionMetadata(
        positions=to(positions), slot_mapping=to(slots), block_tables=tables.to(device),
        context_lens=to([c for _, c in seqs]), cu_seqlens_q=to(cu),
        decode_seqs=to([i for i, (q, _) in enumerate(seqs) if q == 1]),
        query_lens_host=[q for q, _ in seqs], context_lens_host=[c for _, c in seqs], block_size=block_size)
    return query.to(device), kv.to(device), meta
