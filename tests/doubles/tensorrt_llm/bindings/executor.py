"""Test double of `tensorrt_llm.bindings.executor` (TensorRT-LLM 1.2.x), the executor's Python bindings.

Signatures follow the nanobind bindings of NVIDIA/TensorRT-LLM (read from the stored sources at the
commits below; argument names match the pybind twins in cpp/tensorrt_llm/pybind/executor/), file by file:
  - Request, SamplingConfig, OutputConfig, Result, Response, FinishReason:
    cpp/tensorrt_llm/nanobind/executor/request.cpp @ 008b2b8d23af95e4e19fa6f354f9c5f6349b2bfc
  - ExecutorConfig, KvCacheConfig, SchedulerConfig:
    cpp/tensorrt_llm/nanobind/executor/executorConfig.cpp @ 008b2b8d23af95e4e19fa6f354f9c5f6349b2bfc
  - ModelType, CapacitySchedulerPolicy, KvCacheStats, InflightBatchingStats, IterationStats:
    cpp/tensorrt_llm/nanobind/executor/bindings.cpp @ 01315fdb274cd036bfc6d893761ce97eb55305cd
  - Executor: cpp/tensorrt_llm/nanobind/executor/executor.cpp @ 1dd50d0741fa3bdae3ffd2f54e53547cbe1a043d
  - value checks: cpp/tensorrt_llm/executor/samplingConfig.cpp (checkTopK, checkTopP, ...)
  - what a streaming result carries: cpp/tensorrt_llm/batch_manager/llmRequest.cpp createResult
Only the first Executor constructor (an engine directory) is provided. Where the real classes are
nanobind properties, these are plain attributes with the same names.
"""

from __future__ import annotations

import enum
from typing import Any


class ModelType(enum.Enum):
    DECODER_ONLY = 0
    ENCODER_ONLY = 1
    ENCODER_DECODER = 2


class FinishReason(enum.Enum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    TIMED_OUT = 4
    CANCELLED = 5


class CapacitySchedulerPolicy(enum.Enum):
    MAX_UTILIZATION = 0
    GUARANTEED_NO_EVICT = 1
    STATIC_BATCH = 2


class BatchingType(enum.Enum):
    STATIC = 0
    INFLIGHT = 1


class RequestType(enum.Enum):
    REQUEST_TYPE_CONTEXT_AND_GENERATION = 0
    REQUEST_TYPE_CONTEXT_ONLY = 1
    REQUEST_TYPE_GENERATION_ONLY = 2


def _check(ok: bool, what: str) -> None:
    if not ok:  # TLLM_CHECK raises tensorrt_llm::common::TllmException -> RuntimeError in Python
        raise RuntimeError(f"[TensorRT-LLM][ERROR] Assertion failed: {what}")


class SamplingConfig:
    def __init__(self, beam_width: int = 1, *, top_k: int | None = None, top_p: float | None = None,
                 top_p_min: float | None = None, top_p_reset_ids: int | None = None,
                 top_p_decay: float | None = None, seed: int | None = None, temperature: float | None = None,
                 min_tokens: int | None = None, beam_search_diversity_rate: float | None = None,
                 repetition_penalty: float | None = None, presence_penalty: float | None = None,
                 frequency_penalty: float | None = None, length_penalty: float | None = None,
                 early_stopping: int | None = None, no_repeat_ngram_size: int | None = None,
                 num_return_sequences: int | None = None, min_p: float | None = None,
                 beam_width_array: list[int] | None = None) -> None:
        _check(beam_width > 0, "beamWidth > 0")
        _check(top_k is None or top_k >= 0, "topK.value() >= 0")
        _check(top_p is None or 0.0 < top_p <= 1.0, "topP.value() > 0.f && topP.value() <= 1.f")
        _check(temperature is None or temperature >= 0.0, "temperature.value() >= 0.f")
        _check(min_tokens is None or min_tokens >= 0, "minTokens.value() >= 0")
        _check(repetition_penalty is None or repetition_penalty > 0.0,
               "Repetition penalty should be strictly greater than zero")
        _check(min_p is None or 0.0 <= min_p <= 1.0, "minP.value() >= 0.f && minP.value() <= 1.0f")
        _check(seed is None or 0 <= seed < 2**64, "seed fits RandomSeedType (uint64)")
        self.beam_width = beam_width
        self.top_k, self.top_p, self.top_p_min = top_k, top_p, top_p_min
        self.top_p_reset_ids, self.top_p_decay = top_p_reset_ids, top_p_decay
        self.seed, self.temperature, self.min_tokens = seed, temperature, min_tokens
        self.beam_search_diversity_rate = beam_search_diversity_rate
        self.repetition_penalty, self.presence_penalty = repetition_penalty, presence_penalty
        self.frequency_penalty, self.length_penalty = frequency_penalty, length_penalty
        self.early_stopping, self.no_repeat_ngram_size = early_stopping, no_repeat_ngram_size
        self.num_return_sequences, self.min_p, self.beam_width_array = num_return_sequences, min_p, beam_width_array


class OutputConfig:
    def __init__(self, return_log_probs: bool = False, return_context_logits: bool = False,
                 return_generation_logits: bool = False, exclude_input_from_output: bool = False,
                 return_encoder_output: bool = False, return_perf_metrics: bool = False,
                 additional_model_outputs: list[Any] | None = None) -> None:
        self.return_log_probs = bool(return_log_probs)
        self.return_context_logits = return_context_logits
        self.return_generation_logits = return_generation_logits
        self.exclude_input_from_output = exclude_input_from_output
        self.return_encoder_output = return_encoder_output
        self.return_perf_metrics = return_perf_metrics
        self.additional_model_outputs = additional_model_outputs


_REQUEST_OPTIONAL = (
    "end_id", "pad_id", "position_ids", "bad_words", "stop_words", "embedding_bias",
    "external_draft_tokens_config", "prompt_tuning_config", "multimodal_input", "multimodal_embedding",
    "mrope_config", "lora_config", "lookahead_config", "kv_cache_retention_config",
    "logits_post_processor_name", "logits_post_processor", "encoder_input_token_ids", "client_id",
    "context_phase_params", "encoder_input_features", "encoder_output_length", "cross_attention_mask",
    "eagle_config", "skip_cross_attn_blocks", "guided_decoding_params", "language_adapter_uid",
    "allotted_time_ms",
)


class Request:
    BATCHED_POST_PROCESSOR_NAME = "batched"

    def __init__(self, input_token_ids: list[int], max_tokens: int, *, streaming: bool = False,
                 sampling_config: SamplingConfig | None = None, output_config: OutputConfig | None = None,
                 return_all_generated_tokens: bool = False, priority: float = 0.5,
                 type: RequestType = RequestType.REQUEST_TYPE_CONTEXT_AND_GENERATION,  # noqa: A002
                 num_return_sequences: int = 1, **optional: Any) -> None:
        unknown = set(optional) - set(_REQUEST_OPTIONAL)
        if unknown:  # nanobind rejects unknown keywords
            raise TypeError(f"__init__(): incompatible function arguments: {sorted(unknown)}")
        _check(0.0 <= priority <= 1.0, "priority in [0, 1]")
        self.input_token_ids = [int(t) for t in input_token_ids]
        self.max_tokens = int(max_tokens)
        self.streaming = bool(streaming)
        self.sampling_config = sampling_config if sampling_config is not None else SamplingConfig()
        self.output_config = output_config if output_config is not None else OutputConfig()
        self.return_all_generated_tokens = return_all_generated_tokens
        self.priority = float(priority)
        self.request_type = type
        self.num_return_sequences = num_return_sequences
        for name in _REQUEST_OPTIONAL:
            setattr(self, name, optional.get(name))


class Result:
    def __init__(self) -> None:
        self.is_final = False
        self.output_token_ids: list[list[int]] = []
        self.cum_log_probs: list[float] | None = None
        self.log_probs: list[list[float]] | None = None
        self.context_logits = None
        self.generation_logits = None
        self.spec_dec_fast_logits_info = None
        self.encoder_output = None
        self.finish_reasons: list[FinishReason] = []
        self.sequence_index = 0
        self.is_sequence_final = False
        self.decoding_iter = 0
        self.context_phase_params = None
        self.request_perf_metrics = None
        self.additional_outputs: list[Any] = []


class Response:
    """Response(request_id, error_msg, client_id=None) or Response(request_id, result, client_id=None)."""

    def __init__(self, request_id: int, result_or_error: Result | str, client_id: int | None = None) -> None:
        self._request_id = request_id
        self._client_id = client_id
        self._error = result_or_error if isinstance(result_or_error, str) else None
        self._result = None if isinstance(result_or_error, str) else result_or_error

    @property
    def request_id(self) -> int:
        return self._request_id

    @property
    def client_id(self) -> int | None:
        return self._client_id

    def has_error(self) -> bool:
        return self._error is not None

    @property
    def error_msg(self) -> str:
        _check(self._error is not None, "Cannot get the error message: the response has no error")
        return self._error

    @property
    def result(self) -> Result:
        _check(self._result is not None, "Cannot get the result for a response with an error")
        return self._result


class KvCacheConfig:
    def __init__(self, enable_block_reuse: bool = True, max_tokens: int | None = None,
                 max_attention_window: list[int] | None = None, sink_token_length: int | None = None,
                 free_gpu_memory_fraction: float | None = None, host_cache_size: int | None = None,
                 onboard_blocks: bool = True, cross_kv_cache_fraction: float | None = None,
                 secondary_offload_min_priority: int | None = None, event_buffer_max_size: int = 0, *,
                 enable_partial_reuse: bool = True, copy_on_partial_reuse: bool = True, use_uvm: bool = False,
                 runtime_defaults: Any = None) -> None:
        _check(free_gpu_memory_fraction is None or 0.0 < free_gpu_memory_fraction <= 1.0,
               "freeGpuMemoryFraction in (0, 1]")
        self.enable_block_reuse, self.max_tokens = enable_block_reuse, max_tokens
        self.max_attention_window, self.sink_token_length = max_attention_window, sink_token_length
        self.free_gpu_memory_fraction, self.host_cache_size = free_gpu_memory_fraction, host_cache_size
        self.onboard_blocks, self.cross_kv_cache_fraction = onboard_blocks, cross_kv_cache_fraction
        self.secondary_offload_min_priority = secondary_offload_min_priority
        self.event_buffer_max_size = event_buffer_max_size
        self.enable_partial_reuse, self.copy_on_partial_reuse = enable_partial_reuse, copy_on_partial_reuse
        self.use_uvm = use_uvm


class SchedulerConfig:
    def __init__(self, capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT,
                 context_chunking_policy: Any = None, dynamic_batch_config: Any = None) -> None:
        self.capacity_scheduler_policy = capacity_scheduler_policy
        self.context_chunking_policy = context_chunking_policy
        self.dynamic_batch_config = dynamic_batch_config


_EXECUTOR_CONFIG_ARGS = (
    ("max_beam_width", 1), ("scheduler_config", None), ("kv_cache_config", None),
    ("enable_chunked_context", False), ("normalize_log_probs", True), ("iter_stats_max_iterations", 1000),
    ("request_stats_max_iterations", 0), ("batching_type", BatchingType.INFLIGHT), ("max_batch_size", None),
    ("max_num_tokens", None), ("parallel_config", None), ("peft_cache_config", None),
    ("logits_post_processor_config", None), ("decoding_config", None), ("use_gpu_direct_storage", False),
    ("gpu_weights_percent", 1.0), ("max_queue_size", None), ("extended_runtime_perf_knob_config", None),
    ("debug_config", None), ("recv_poll_period_ms", 0), ("max_seq_idle_microseconds", 180_000_000),
    ("spec_dec_config", None), ("guided_decoding_config", None), ("additional_model_outputs", None),
    ("cache_transceiver_config", None), ("gather_generation_logits", False), ("mm_embedding_offloading", False),
    ("enable_trt_overlap", False),
)


class ExecutorConfig:
    """ExecutorConfig(max_beam_width=1, scheduler_config=SchedulerConfig(), kv_cache_config=KvCacheConfig(), ...):
    every argument positional-or-keyword, in the bindings' order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = [n for n, _ in _EXECUTOR_CONFIG_ARGS]
        if len(args) > len(names) or set(kwargs) - set(names) or set(kwargs) & set(names[:len(args)]):
            raise TypeError("__init__(): incompatible function arguments")
        values = dict(_EXECUTOR_CONFIG_ARGS)
        values.update(zip(names, args))
        values.update(kwargs)
        values["scheduler_config"] = values["scheduler_config"] or SchedulerConfig()
        values["kv_cache_config"] = values["kv_cache_config"] or KvCacheConfig()
        for name, value in values.items():
            setattr(self, name, value)


class KvCacheStats:
    def __init__(self) -> None:
        self.max_num_blocks = 0
        self.free_num_blocks = 0
        self.used_num_blocks = 0
        self.tokens_per_block = 0
        self.alloc_total_blocks = 0
        self.alloc_new_blocks = 0
        self.reused_blocks = 0
        self.missed_blocks = 0
        self.cache_hit_rate = 0.0


class InflightBatchingStats:
    def __init__(self) -> None:
        self.num_scheduled_requests = 0
        self.num_context_requests = 0
        self.num_gen_requests = 0
        self.num_paused_requests = 0
        self.num_ctx_tokens = 0
        self.micro_batch_id = 0
        self.avg_num_decoded_tokens_per_iter = 0.0


class IterationStats:
    def __init__(self) -> None:
        self.timestamp = ""
        self.iter = 0
        self.iter_latency_ms = 0.0
        self.new_active_requests_queue_latency_ms = 0.0
        self.num_new_active_requests = 0
        self.num_active_requests = 0
        self.num_queued_requests = 0
        self.num_completed_requests = 0
        self.max_num_active_requests = 0
        self.gpu_mem_usage = 0
        self.cpu_mem_usage = 0
        self.pinned_mem_usage = 0
        self.kv_cache_stats: KvCacheStats | None = None
        self.cross_kv_cache_stats: KvCacheStats | None = None
        self.static_batching_stats = None
        self.inflight_batching_stats: InflightBatchingStats | None = None
        self.specdec_stats = None


from ._runtime import Executor  # noqa: E402,F401  (re-exported: the real module is flat)
