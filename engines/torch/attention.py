"""Attention over the paged KV cache, behind a small backend interface.

The runner flattens one step's chunks into a single token dimension (no padding) and describes
them with `AttentionMetadata`. A backend writes the step's K/V into the cache at `slot_mapping`
and attends each query token over its sequence's cached positions (causal). `TorchAttention` is
the portable implementation (plain torch, CPU or CUDA); a FlashAttention / paged-attention CUDA
kernel, or a CUDA-graph-captured decode path, slots in by implementing the same two methods.

Sliding-window attention (Mistral v0.1) is not applied: attention is always full-context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from tokenrelay_engines.torch.kernels.native import CpuKernels


@dataclass(slots=True)
class AttentionMetadata:
    """Device tensors describing one flattened step, plus the host copies the backend may branch on.

    Sequence i owns query tokens cu_seqlens_q[i]:cu_seqlens_q[i+1] of the flat batch; after this
    step its cache holds context_lens[i] tokens, found through block_tables[i].
    """

    positions: torch.Tensor  # [T] int64: position of each flat token
    slot_mapping: torch.Tensor  # [T] int64: block * block_size + offset where its K/V go
    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    context_lens: torch.Tensor  # [B] int64
    cu_seqlens_q: torch.Tensor  # [B + 1] int64
    decode_seqs: torch.Tensor  # [D] int64: indices of the sequences with query length 1
    query_lens_host: list[int]
    context_lens_host: list[int]
    block_size: int
    # Filled by TorchAttention on the step's first layer and reused by every other layer.
    decode_plan: DecodePlan | None = None
    kernel_rows: tuple[torch.Tensor, torch.Tensor] | None = None  # CpuKernelAttention's (tables, lens) per token
    # Every query length is 1; None: found from query_lens_host here (the runner knows it already).
    decode_only: bool | None = None

    def __post_init__(self) -> None:
        # Lengths are not checked per sequence here (every step, every row): the scheduler only
        # schedules chunks with 1 <= query_len <= context_len.
        if len(self.query_lens_host) != len(self.context_lens_host):
            raise ValueError("query_lens_host and context_lens_host must have one entry per sequence")
        if self.decode_only is None:
            self.decode_only = all(q == 1 for q in self.query_lens_host)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_host)

    @property
    def is_decode_only(self) -> bool:
        return bool(self.decode_only)


class DecodePlan(NamedTuple):
    """What the decode rows of one step read from the cache, the same for every layer."""

    token_idx: torch.Tensor | None  # [D] flat token of each decode row; None: token i is sequence i
    block_ids: torch.Tensor  # [D * n] the rows' block tables, flattened, padded with block 0
    bias: torch.Tensor  # [D, 1, 1, n * block_size] 0 where a position is in context, -inf past it
    num_rows: int
    num_blocks: int  # n: blocks per row


class AttentionBackend(Protocol):
    def write_kv(self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        """Store key/value [T, kv_heads, head_dim] into kv_cache [2, blocks, block_size, kv_heads, head_dim]."""

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        """query [T, heads, head_dim] -> output [T, heads, head_dim], causal over cached positions."""


class TorchAttention:
    """Portable backend: scaled_dot_product_attention over K/V read from the block tables.

    Decode tokens (query length 1) of a step are attended together in one batch: which blocks
    each row reads and its padding mask are worked out once per step (`DecodePlan`), then each
    layer copies those blocks with one `index_select` for K and V together and runs SDPA with
    the query heads of a KV head as its query rows (no repeat of K/V per query head). Prefill
    chunks are attended one sequence at a time (their shapes come from host ints, so no device
    synchronisation).
    """

    def write_kv(self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 meta: AttentionMetadata) -> None:
        _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
        kv_cache[0].view(num_blocks * block_size, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, key)
        kv_cache[1].view(num_blocks * block_size, kv_heads, head_dim).index_copy_(0, meta.slot_mapping, value)

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        if meta.is_decode_only:
            return self._decode(query, kv_cache, meta, scale)
        out = torch.empty_like(query)
        if any(q == 1 for q in meta.query_lens_host):
            plan = self._plan(meta, query.dtype)
            out[plan.token_idx] = self._decode(query[plan.token_idx], kv_cache, meta, scale)
        start = 0
        for i, (q_len, ctx) in enumerate(zip(meta.query_lens_host, meta.context_lens_host)):
            if q_len > 1:
                out[start:start + q_len] = self._prefill_one(
                    query[start:start + q_len], kv_cache, meta.block_tables[i], ctx, meta.block_size, scale)
            start += q_len
        return out

    @staticmethod
    def _read_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """block_ids [n] -> [2, n * block_size, kv_heads, head_dim]: K and V in one copy."""
        kv = kv_cache.index_select(1, block_ids)
        return kv.view(2, -1, *kv.shape[-2:])

    def _prefill_one(self, q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                     ctx: int, block_size: int, scale: float) -> torch.Tensor:
        q_len = q.shape[0]
        num_blocks = -(-ctx // block_size)
        kv = self._read_blocks(kv_cache, block_table[:num_blocks])
        k, v = kv[0, :ctx].transpose(0, 1), kv[1, :ctx].transpose(0, 1)  # [kv_heads, ctx, d]
        qh = q.transpose(0, 1)  # [heads, q_len, d]
        if q_len == ctx:
            o = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            q_pos = torch.arange(ctx - q_len, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return o.transpose(0, 1)

    @staticmethod
    def _plan(meta: AttentionMetadata, dtype: torch.dtype) -> DecodePlan:
        if meta.decode_plan is not None:
            return meta.decode_plan
        rows = [i for i, q in enumerate(meta.query_lens_host) if q == 1]
        if len(rows) == meta.num_seqs:
            token_idx, tables, lens = None, meta.block_tables, meta.context_lens
            max_ctx = max(meta.context_lens_host)
        else:
            rows_t = meta.decode_seqs
            token_idx = meta.cu_seqlens_q[rows_t]
            tables, lens = meta.block_tables[rows_t], meta.context_lens[rows_t]
            max_ctx = max(meta.context_lens_host[i] for i in rows)
        num_blocks = -(-max_ctx // meta.block_size)
        positions = torch.arange(num_blocks * meta.block_size, device=lens.device)
        bias = torch.zeros((len(rows), 1, 1, positions.shape[0]), dtype=dtype, device=lens.device)
        bias.masked_fill_((positions[None, :] >= lens[:, None])[:, None, None, :], float("-inf"))
        meta.decode_plan = DecodePlan(token_idx, tables[:, :num_blocks].reshape(-1), bias, len(rows), num_blocks)
        return meta.decode_plan

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                scale: float) -> torch.Tensor:
        """q [D, heads, d] (the decode rows' tokens, in row order) -> [D, heads, d]."""
        plan = self._plan(meta, q.dtype)
        kv = self._read_blocks(kv_cache, plan.block_ids).view(2, plan.num_rows, -1, *kv_cache.shape[-2:])
        k, v = kv[0].transpose(1, 2), kv[1].transpose(1, 2)  # [D, kv_heads, n * block_size, d]
        # The query heads that share a KV head act as that head's query rows (head h reads KV
        # head h // group, as in grouped-query attention): one [group, d] x [d, ctx] product per
        # KV head instead of `group` single-row ones.
        rows, heads, dim = q.shape
        kv_heads = k.shape[1]
        o = F.scaled_dot_product_attention(q.view(rows, kv_heads, heads // kv_heads, dim), k, v,
                                           attn_mask=plan.bias, scale=scale)
        return o.reshape(rows, heads, dim)


class CpuKernelAttention(TorchAttention):
    """TorchAttention with each layer's attention one C call (kernels/ops.c) that reads K/V in place
    from the paged cache (no block copies, no padding mask). Every token of the step is a row of its
    own, with its sequence's block table and its position + 1 as context length: decode rows as they
    are, prefill chunks causal without a mask. Float32 only, head dims a multiple of 16; other steps
    go to TorchAttention."""

    def __init__(self, kernels: CpuKernels) -> None:
        self.kernels = kernels

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        if query.dtype != torch.float32 or query.shape[-1] % 16 or kv_cache.dtype != torch.float32:
            return super().attend(query, kv_cache, meta, scale)
        if meta.kernel_rows is None:
            if meta.is_decode_only:
                meta.kernel_rows = (meta.block_tables, meta.context_lens)
            else:
                seqs = torch.repeat_interleave(torch.arange(meta.num_seqs), torch.tensor(meta.query_lens_host))
                meta.kernel_rows = (meta.block_tables.index_select(0, seqs), meta.positions + 1)
        tables, lens = meta.kernel_rows
        return self.kernels.paged_attention(query.contiguous(), kv_cache, tables, lens, scale)
