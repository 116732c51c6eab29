"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed over persistent buffers.

A decode-only step of n sequences runs the graph of the smallest bucket >= n: the step's input
ids, positions, slots, block tables and context lengths are copied into the persistent buffers
(rows n..bucket-1 repeat the last real row: they rewrite its K/V slot with the same values and
their outputs are dropped), the graph replays the whole model forward (embedding, every layer's
KV write and Triton paged attention, final norm), and the first n rows of the persistent output
are the hidden states. Logits and sampling stay outside the graph.

The attention inside the graphs launches a fixed number of decode partitions (enough for
`max_context_len`), so a graph is valid for every context up to it; longer contexts, prefill
chunks and batches larger than the largest bucket run eagerly. CUDA only.
"""

from __future__ import annotations

import bisect
import logging

import torch

from tokenrelay_engines.torch.attention import AttentionMetadata

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)
MAX_GRAPH_CONTEXT = 8192  # contexts beyond this decode eagerly (the graph's partition count is fixed)

log = logging.getLogger(__name__)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv: torch.Tensor, *, max_batch: int, max_context_len: int,
                 block_size: int, hidden_size: int, device: torch.device, dtype: torch.dtype) -> None:
        from tokenrelay_engines.torch.triton_attention import TritonAttention

        self.model, self.kv, self.block_size = model, kv, block_size
        self.max_context_len = min(max_context_len, MAX_GRAPH_CONTEXT)
        self.backend = TritonAttention(max_context_len=self.max_context_len)
        self.buckets = [b for b in BUCKETS if b <= max_batch] or [1]
        top = self.buckets[-1]
        i64 = dict(device=device, dtype=torch.int64)
        self.input_ids = torch.zeros(top, **i64)
        self.positions = torch.zeros(top, **i64)
        self.slots = torch.zeros(top, **i64)
        self.tables = torch.zeros(top, -(-self.max_context_len // block_size), **i64)
        self.context_lens = torch.ones(top, **i64)
        self.cu = torch.arange(top + 1, **i64)
        self.output = torch.zeros(top, hidden_size, device=device, dtype=dtype)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # bucket -> graph (anything with replay())
        self.pool = None

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            positions=self.positions[:b], slot_mapping=self.slots[:b], block_tables=self.tables[:b],
            context_lens=self.context_lens[:b], cu_seqlens_q=self.cu[:b + 1], decode_seqs=self.cu[:b],
            query_lens_host=[1] * b, context_lens_host=[1] * b, block_size=self.block_size)

    def _forward(self, b: int) -> None:
        self.output[:b] = self.model(self.input_ids[:b], self.positions[:b], self.kv, self._meta(b), self.backend)

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest bucket first, sharing one memory pool. Compiles the kernels eagerly before capturing."""
        if self.output.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        for b in reversed(self.buckets):
            self._forward(b)  # warm-up: Triton JIT and cuBLAS heuristics outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self._forward(b)
            self.pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (bool(self.graphs) and meta.is_decode_only and meta.num_seqs <= self.buckets[-1]
                and max(meta.context_lens_host) <= self.max_context_len)

    def run(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = meta.num_seqs
        b = self.buckets[bisect.bisect_left(self.buckets, n)]
        width = meta.block_tables.shape[1]
        for buf, src in ((self.input_ids, input_ids), (self.positions, meta.positions),
                         (self.slots, meta.slot_mapping), (self.context_lens, meta.context_lens)):
            buf[:n].copy_(src)
            buf[n:b].copy_(src[n - 1:n].expand(b - n))
        self.tables[:n, :width].copy_(meta.block_tables)
        self.tables[n:b, :width].copy_(meta.block_tables[n - 1:n].expand(b - n, width))
        self.graphs[b].replay()
        return self.output[:n]
