"""Paged attention in Triton: K/V are read through the block tables in place, never gathered.

Two kernels implement `AttentionBackend.attend` (write_kv is TorchAttention's `index_copy_` into
the flat slot view, already copy-free):

- decode (every sequence has one query token): split-K "flash decoding". Program (row, kv head,
  partition) walks PARTITION cached positions of one sequence, block by block through its block
  table, for all query heads of its KV group at once (GQA reads each K/V tile once), keeping an
  online softmax; a second kernel merges the partitions. With a fixed number of partitions the
  launch shape depends only on the batch size, so it can be captured in a CUDA graph.
- varlen prefill (any mix of prefill chunks and decode tokens): program (sequence, query tile,
  head) attends BLOCK_M query rows of one sequence to its cached positions up to the tile's last
  row (causal), tile by tile through the block table, flash-attention style, with tl.dot.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported): that is how CI checks them against TorchAttention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenrelay_engines.torch.attention import AttentionMetadata, TorchAttention

PARTITION = 256  # cached positions per decode program
BLOCK_N = 16  # cached positions per inner tile (a divisor of PARTITION)
BLOCK_M = 16  # query rows per prefill program


@triton.jit
def _decode_partitions(q_ptr, k_ptr, v_ptr, tables_ptr, ctx_ptr, tok_ptr, po_ptr, pm_ptr, pl_ptr, scale,
                       stride_qt, stride_qh, stride_kb, stride_ko, stride_kh, stride_tb, num_heads, num_parts,
                       BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                       HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, TILE: tl.constexpr, PART: tl.constexpr):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    ctx = tl.load(ctx_ptr + row)
    tok = tl.load(tok_ptr + row)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    heads = kvh * GROUP + g
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + tok * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    den = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    start = part * PART
    end = tl.minimum(ctx, start + PART)
    for n in range(start, end, TILE):
        pos = n + tl.arange(0, TILE)
        pmask = pos < end
        blk = tl.load(tables_ptr + row * stride_tb + pos // BLOCK_SIZE, mask=pmask, other=0)
        off = blk * stride_kb + (pos % BLOCK_SIZE) * stride_ko + kvh * stride_kh
        kvmask = pmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + off[:, None] + d[None, :], mask=kvmask, other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
        s = tl.where(pmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(v_ptr + off[:, None] + d[None, :], mask=kvmask, other=0.0).to(tl.float32)
        den = den * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    base = (row * num_heads + heads) * num_parts + part  # [GROUP_PAD]: (row, head, part)
    tl.store(pm_ptr + base, m, mask=gmask)
    tl.store(pl_ptr + base, den, mask=gmask)
    tl.store(po_ptr + base[:, None] * D_PAD + d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _merge_partitions(o_ptr, tok_ptr, po_ptr, pm_ptr, pl_ptr, stride_ot, stride_oh, num_heads, num_parts,
                      HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, P_PAD: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    p = tl.arange(0, P_PAD)
    d = tl.arange(0, D_PAD)
    pmask = p < num_parts
    base = (row * num_heads + head) * num_parts + p
    m = tl.load(pm_ptr + base, mask=pmask, other=float("-inf"))
    den = tl.load(pl_ptr + base, mask=pmask, other=0.0)
    acc = tl.load(po_ptr + base[:, None] * D_PAD + d[None, :], mask=pmask[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(pmask & (den > 0), tl.exp(m - m_max), 0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * den, axis=0)
    tok = tl.load(tok_ptr + row)
    tl.store(o_ptr + tok * stride_ot + head * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _varlen_prefill(q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, ctx_ptr, cu_ptr, scale,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ko, stride_kh, stride_tb,
                    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                    TILE_M: tl.constexpr, TILE_N: tl.constexpr):
    seq = tl.program_id(0)
    mtile = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_ptr + seq)
    q_len = tl.load(cu_ptr + seq + 1) - q_start
    if mtile * TILE_M >= q_len:
        return
    ctx = tl.load(ctx_ptr + seq)
    kvh = head // GROUP
    rows = mtile * TILE_M + tl.arange(0, TILE_M)
    rmask = rows < q_len
    q_pos = ctx - q_len + rows  # each query row's position in its sequence
    d = tl.arange(0, D_PAD)
    dmask = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    m = tl.full([TILE_M], float("-inf"), tl.float32)
    den = tl.zeros([TILE_M], tl.float32)
    acc = tl.zeros([TILE_M, D_PAD], tl.float32)
    hi = tl.minimum(ctx, ctx - q_len + (mtile + 1) * TILE_M)  # causal: nothing past the tile's last row
    for n in range(0, hi, TILE_N):
        pos = n + tl.arange(0, TILE_N)
        pmask = pos < ctx
        blk = tl.load(tables_ptr + seq * stride_tb + pos // BLOCK_SIZE, mask=pmask, other=0)
        off = blk * stride_kb + (pos % BLOCK_SIZE) * stride_ko + kvh * stride_kh
        kvmask = pmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + off[:, None] + d[None, :], mask=kvmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        s = tl.where(pmask[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(v_ptr + off[:, None] + d[None, :], mask=kvmask, other=0.0)
        den = den * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new
    out = acc / den[:, None]
    tl.store(o_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


def _pad(n: int, at_least: int = 1) -> int:
    return max(triton.next_power_of_2(n), at_least)


class TritonAttention(TorchAttention):
    """`AttentionBackend` with Triton paged-attention kernels (CUDA; Triton's interpreter on CPU).

    `max_context_len`: when set, decode launches a fixed number of partitions (enough for this
    context), so a captured CUDA graph stays valid for every context length up to it.
    """

    def __init__(self, max_context_len: int | None = None) -> None:
        self.max_context_len = max_context_len

    def attend(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
               scale: float) -> torch.Tensor:
        out = torch.empty_like(query)
        if meta.is_decode_only:
            self._decode(query, kv_cache, meta, scale, out)
        else:
            self._prefill(query, kv_cache, meta, scale, out)
        return out

    @staticmethod
    def _shape(query: torch.Tensor, kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
        _, num_heads, head_dim = query.shape
        kv_heads = kv_cache.shape[3]
        if num_heads % kv_heads:
            raise ValueError(f"{num_heads} query heads do not group over {kv_heads} KV heads")
        return num_heads, kv_heads, num_heads // kv_heads, head_dim

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                out: torch.Tensor) -> None:
        num_heads, kv_heads, group, head_dim = self._shape(query, kv_cache)
        rows = meta.num_seqs
        longest = self.max_context_len or max(meta.context_lens_host)
        num_parts = triton.cdiv(longest, PARTITION)
        d_pad = _pad(head_dim, 16)
        part_out = torch.empty(rows * num_heads * num_parts * d_pad, device=query.device, dtype=torch.float32)
        part_m = torch.empty(rows * num_heads * num_parts, device=query.device, dtype=torch.float32)
        part_l = torch.empty_like(part_m)
        k, v = kv_cache[0], kv_cache[1]
        tok = meta.cu_seqlens_q  # decode only: sequence i owns flat token i
        _decode_partitions[(rows, kv_heads, num_parts)](
            query, k, v, meta.block_tables, meta.context_lens, tok, part_out, part_m, part_l, scale,
            query.stride(0), query.stride(1), k.stride(0), k.stride(1), k.stride(2), meta.block_tables.stride(0),
            num_heads, num_parts, BLOCK_SIZE=meta.block_size, GROUP=group, GROUP_PAD=_pad(group),
            HEAD_DIM=head_dim, D_PAD=d_pad, TILE=BLOCK_N, PART=PARTITION)
        _merge_partitions[(rows, num_heads)](
            out, tok, part_out, part_m, part_l, out.stride(0), out.stride(1), num_heads, num_parts,
            HEAD_DIM=head_dim, D_PAD=d_pad, P_PAD=_pad(num_parts))

    def _prefill(self, query: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                 out: torch.Tensor) -> None:
        num_heads, _, group, head_dim = self._shape(query, kv_cache)
        k, v = kv_cache[0], kv_cache[1]
        grid = (meta.num_seqs, triton.cdiv(max(meta.query_lens_host), BLOCK_M), num_heads)
        _varlen_prefill[grid](
            query, k, v, out, meta.block_tables, meta.context_lens, meta.cu_seqlens_q, scale,
            query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            k.stride(0), k.stride(1), k.stride(2), meta.block_tables.stride(0),
            BLOCK_SIZE=meta.block_size, GROUP=group, HEAD_DIM=head_dim, D_PAD=_pad(head_dim, 16),
            TILE_M=BLOCK_M, TILE_N=BLOCK_N)
