"""Typed engine configuration, built once in `server.main` from flags and env vars."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # most sequences in one step's batch
    max_num_batched_tokens: int = 2048  # token budget per step (decode + prefill chunks)
    block_size: int = 16  # tokens per KV block
    num_blocks: int = 0  # KV blocks in the pool; 0: the runner sizes it from memory
    max_model_len: int = 0  # 0: the model's context length
    enable_prefix_caching: bool = False  # share computed full prompt blocks between requests

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.block_size < 1:
            raise ValueError("scheduler limits must be positive")
        if self.num_blocks < 0 or self.max_model_len < 0:
            raise ValueError("num_blocks and max_model_len must be >= 0")


@dataclass(slots=True, frozen=True)
class TorchEngineConfig:
    model: str = ""  # a Hugging Face model directory; "" serves the embedded demo model
    load_format: str = "auto"  # "auto": weights from the directory; "dummy": random weights
    dummy_shape: str = ""  # with load_format="dummy" and no model: a named shape, e.g. "llama-3.1-8b"
    device: str = "cpu"  # "cpu" or "cuda[:n]"
    # "auto": bfloat16 on CUDA and on CPUs with AMX / AVX-512 BF16, else float32; or float32,
    # bfloat16, float16
    dtype: str = "auto"
    num_threads: int = 0  # CPU intra-op threads; 0: this process's physical cores
    kv_cache_memory_fraction: float = 0.3  # of free device memory, when num_blocks is 0
    seed: int = 0  # for dummy weights
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', not {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.num_threads < 0:
            raise ValueError("num_threads must be >= 0")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1]")
