"""The paged KV cache: one preallocated tensor, and how many blocks fit in memory."""

from __future__ import annotations

import os

import torch

from tokenrelay_engines.torch.shapes import ModelConfig

CPU_DEFAULT_KV_TOKENS = 65536  # on CPU without num_blocks: room for this many tokens, capped by RAM


class KVCache:
    """kv [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]; block b holds positions
    b_idx * block_size ... of whichever sequence lists b at index b_idx of its block table."""

    def __init__(self, model: ModelConfig, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs num_blocks >= 1 and block_size >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv = torch.zeros(model.num_hidden_layers, 2, num_blocks, block_size,
                              model.num_key_value_heads, model.head_dim, device=device, dtype=dtype)

    def layer(self, idx: int) -> torch.Tensor:
        return self.kv[idx]

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return model.num_hidden_layers * 2 * block_size * model.num_key_value_heads * model.head_dim * elem


def available_cpu_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def size_num_blocks(model: ModelConfig, block_size: int, dtype: torch.dtype, device: torch.device,
                    memory_fraction: float, configured: int = 0) -> int:
    """`configured` when set; else a fraction of free device memory (CUDA) or a fixed token
    budget capped by a fraction of available RAM (CPU). Raises when not even one block fits."""
    if configured > 0:
        return configured
    per_block = bytes_per_block(model, block_size, dtype)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        num = int(free * memory_fraction) // per_block
    else:
        wanted = -(-CPU_DEFAULT_KV_TOKENS // block_size)
        num = min(wanted, int(available_cpu_bytes() * memory_fraction) // per_block)
    if num < 1:
        raise MemoryError(f"no room for a single KV block of {per_block} bytes on {device}")
    return num
