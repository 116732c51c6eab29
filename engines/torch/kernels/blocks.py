"""GGUF block-quantized weights as modules: `BlockWeight` (one weight matrix's blocks), the
linear layer that runs it through the CPU kernels, and the embedding that looks rows up in it.

A GGUF matrix [N, K] of Q4_1 or Q8_0 is N rows of K/32 blocks, each block 32 consecutive weights
of a row with a float16 scale d (and, for Q4_1, a float16 min m):
    Q4_1 block (20 bytes): d, m, 16 bytes of nibbles;  w = d * q + m, q in 0..15
    Q8_0 block (34 bytes): d, 32 int8;                  w = d * q
Kept here as row-major tensors: qs [N, K/2] uint8 (Q4_1) or [N, K] int8 (Q8_0), d and m float32
[N, K/32] (float16 widened once; exact). Rows are independent, so a row permutation (llama.cpp's
q/k order) and concatenation along N (fused q|k|v, gate|up) work on the blocks directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tokenrelay_engines.torch.kernels.native import CpuKernels

BLOCK = 32
# GGUF type name -> bytes per block
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}


@dataclass(frozen=True, slots=True)
class BlockWeight:
    kind: str  # "Q4_1" or "Q8_0"
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None  # Q4_1 only

    @property
    def out_features(self) -> int:
        return self.qs.shape[0]

    @property
    def in_features(self) -> int:
        return self.d.shape[1] * BLOCK

    @classmethod
    def from_gguf(cls, kind: str, raw: np.ndarray, rows: int) -> BlockWeight:
        """From a GGUF tensor's raw bytes (`ReaderTensor.data` of a quantized type)."""
        blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, -1, BLOCK_BYTES[kind])
        d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
        if kind == "Q4_1":
            m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
            qs = torch.from_numpy(np.ascontiguousarray(blocks[..., 4:]).reshape(rows, -1))
            return cls(kind, qs, d, m)
        qs = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).reshape(rows, -1).view(np.int8))
        return cls(kind, qs, d, None)

    def permute_rows(self, order: torch.Tensor) -> BlockWeight:
        return BlockWeight(self.kind, self.qs[order].contiguous(), self.d[order].contiguous(),
                           None if self.m is None else self.m[order].contiguous())

    @staticmethod
    def cat(parts: list[BlockWeight]) -> BlockWeight | None:
        """Rows of all parts, one after another; None when they do not share kind and K."""
        if len({(p.kind, p.in_features) for p in parts}) != 1:
            return None
        m = None if parts[0].m is None else torch.cat([p.m for p in parts])
        return BlockWeight(parts[0].kind, torch.cat([p.qs for p in parts]), torch.cat([p.d for p in parts]), m)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 weights [len(rows) or N, K], bit-identical to gguf.quants.dequantize."""
        qs = self.qs if rows is None else self.qs[rows]
        d = (self.d if rows is None else self.d[rows]).unsqueeze(-1)
        n = qs.shape[0]
        if self.kind == "Q8_0":
            return (qs.view(n, -1, BLOCK).float() * d).view(n, -1)
        nibbles = qs.view(n, -1, BLOCK // 2)
        q = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1).float()
        m = (self.m if rows is None else self.m[rows]).unsqueeze(-1)
        return (d * q + m).view(n, -1)


class BlockQuantLinear(nn.Module):
    """y = x @ W^T (+ bias), W in GGUF blocks, by row count (see matmul.c): under
    `kernels.float_min_rows` rows x is rounded to 16 bits per block of 32 and multiplied in integers;
    from there on the kernel dequantizes weight rows exactly into L1 and multiplies in float32. So a
    row's result depends on which side of float_min_rows the batch is, never on the other rows.

    Float32 in and out of the kernels (other dtypes are converted at the edges); `dtype` is the
    model's, for a float copy of the weight (`_fused_linear` when formats are mixed). A decode step
    calls every linear layer once per token batch, so the call is kept lean: the C function and the
    weight pointers are looked up once (and again after `.to()` and the like, see `_apply`)."""

    def __init__(self, weight: BlockWeight, kernels: CpuKernels, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.kind = weight.kind
        self.kernels = kernels
        self.dtype = dtype
        self.register_buffer("qs", weight.qs, persistent=False)
        self.register_buffer("d", weight.d, persistent=False)
        self.register_buffer("m", weight.m, persistent=False)
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
        self._bind()

    def _bind(self) -> None:
        self._fn = self.kernels.linear_fn(self.kind)
        self._k, self._n = self.in_features, self.out_features
        weights = (self.qs, self.d) if self.m is None else (self.qs, self.d, self.m)
        self._weight_args = tuple(t.data_ptr() for t in weights)
        self._has_bias = self.bias is not None

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        out = super()._apply(fn, recurse)
        self._bind()  # buffers may have moved
        return out

    @property
    def weight(self) -> BlockWeight:
        return BlockWeight(self.kind, self.qs, self.d, self.m)

    @property
    def in_features(self) -> int:
        return self.d.shape[1] * BLOCK

    @property
    def out_features(self) -> int:
        return self.qs.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, self._k)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.to(torch.float32).contiguous()
        rows = x2.shape[0]
        y = torch.empty((rows, self._n), dtype=torch.float32)
        if self._fn(x2.data_ptr(), rows, self._k, *self._weight_args, self._n, y.data_ptr()) != 0:
            raise MemoryError(f"no memory for the scratch of a {rows} x {self._k} block-quantized matmul")
        if self._has_bias:
            y += self.bias
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], self._n)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


class BlockQuantEmbedding(nn.Module):
    """Token embeddings looked up in block-quantized rows (dequantized per looked-up row)."""

    def __init__(self, weight: BlockWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.kind = weight.kind
        self.dtype = dtype
        self.register_buffer("qs", weight.qs, persistent=False)
        self.register_buffer("d", weight.d, persistent=False)
        self.register_buffer("m", weight.m, persistent=False)

    @property
    def weight(self) -> BlockWeight:
        return BlockWeight(self.kind, self.qs, self.d, self.m)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.dequantize(ids.reshape(-1)).to(self.dtype).view(*ids.shape, -1)
