"""Our request <-> TensorRT-LLM executor request: every field of `engines.base.Request` in one place.

`tllm` is the module `tensorrt_llm.bindings.executor` (passed in, so this file imports nothing of
TensorRT-LLM). Every constructor call below was checked against TensorRT-LLM's own bindings, read
from the stored NVIDIA/TensorRT-LLM sources (not from an installed 1.2.x wheel, which cannot be
installed here):
  - Request, SamplingConfig, OutputConfig, FinishReason: cpp/tensorrt_llm/nanobind/executor/request.cpp
    at commit 008b2b8d23af95e4e19fa6f354f9c5f6349b2bfc, and the pybind twin
    cpp/tensorrt_llm/pybind/executor/request.cpp (same argument names; older releases made
    max_tokens keyword-only, so every argument is passed by keyword);
  - value ranges: cpp/tensorrt_llm/executor/samplingConfig.cpp (temperature >= 0, 0 < top_p <= 1,
    top_k >= 0, 0 <= min_p <= 1, repetition_penalty > 0, min_tokens >= 0);
  - `end_id=-1` disables end-of-sequence, as TensorRT-LLM's own LLM API does for ignore_eos
    (tensorrt_llm/executor/base_worker.py: `end_id=-1 if sampling_params.ignore_eos else ...`);
  - Request.priority is a float in [0, 1], higher first, default 0.5 (executor.h kDefaultPriority).

What we deliberately do NOT hand to the executor, and why:
  - stop token ids and stop strings: the executor's `stop_words` leaks host memory per request
    (NVIDIA/TensorRT-LLM#5509, "[TRT Executor] Setting stop_words in requests leads to memory
    leak"), so stops are ours: `check_stop` below, the same rule as engines/scheduler/scheduler.py,
    and the shared detokenizer (engines/detokenizer.py) for stop strings, exactly as on the
    reference engine; on a match we `cancel_request` and drop the executor's later tokens.
  - logprobs through generation logits: cancelling a streaming request whose logprobs come from
    gathered generation logits crashes the TensorRT backend (NVIDIA/TensorRT-LLM#10810, "TRT
    backend crashes upon request cancellation whilst streaming and logprobs are enabled"). We
    never set `return_generation_logits` nor ExecutorConfig.gather_generation_logits; logprobs
    come from `OutputConfig.return_log_probs` (the decoder's own log probs), so our cancels are
    safe. The executor returns only the sampled token's logprob (no top alternatives): the engine
    advertises max_logprobs = 0.
  - one difference remains: before min_tokens the executor bans only `end_id` (SamplingConfig
    min_tokens); stop token ids and further eos ids are not banned there (the reference engine bans
    them), they just do not stop the request until min_tokens is reached.
  - the deadline: `Request.allotted_time_ms` exists only in newer bindings; we cancel ourselves
    at the deadline (a loop timer + cancel_request) and report FinishReason.DEADLINE.
  - `Request.output_kind`: the executor request always streams (`streaming=True`), also for
    FINAL_ONLY, because our layer matches stop strings and deadlines on the stream; the caller
    merges the deltas (FINAL_ONLY allows one output, it does not require it).
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

from tokenrelay_engines.base import FinishReason, Request, StoppingCriteria
from tokenrelay_engines.detokenizer import IncrementalDetokenizer

DEFAULT_EXECUTOR_PRIORITY = 0.5


def executor_priority(priority: int) -> float:
    """Ours: an int, lower runs first, 0 by default. The executor's: a float in [0, 1], higher
    runs first, 0.5 by default. A strictly decreasing map with 0 -> 0.5."""
    return 0.5 - math.atan(priority) / math.pi


def sampling_config(tllm: ModuleType, request: Request, seed: int) -> Any:
    sp = request.sampling
    min_tokens = request.stopping.min_tokens or None
    if sp.greedy:  # greedy is top_k = 1 to the executor (LLM API: _greedy_decoding)
        return tllm.SamplingConfig(
            beam_width=1, top_k=1, seed=seed, min_tokens=min_tokens,
            repetition_penalty=None if sp.repetition_penalty == 1.0 else sp.repetition_penalty,
            presence_penalty=sp.presence_penalty or None, frequency_penalty=sp.frequency_penalty or None)
    # top_k and top_p are always explicit: with both unset the executor decodes greedily whatever
    # the temperature ("temperature = top_p = top_k = None: greedy", docs/source/features/sampling.md);
    # top_k = 0 and top_p = 1 are "off", as TensorRT-LLM's own OpenAI server sends for plain sampling.
    return tllm.SamplingConfig(
        beam_width=1,
        top_k=sp.top_k,  # 0: off
        top_p=sp.top_p,  # 1.0: off
        temperature=sp.temperature,
        min_p=sp.min_p or None,
        seed=seed,
        min_tokens=min_tokens,
        repetition_penalty=None if sp.repetition_penalty == 1.0 else sp.repetition_penalty,
        presence_penalty=sp.presence_penalty or None,
        frequency_penalty=sp.frequency_penalty or None,
    )


def build_request(tllm: ModuleType, request: Request, *, seed: int, end_id: int) -> Any:
    """The executor request for `request`: streaming deltas, prompt excluded from the output."""
    stopping = request.stopping
    output_config = tllm.OutputConfig(
        return_log_probs=request.sampling.logprobs is not None,
        exclude_input_from_output=True,
    )
    return tllm.Request(  # every argument by keyword: positions moved between releases (max_new_tokens era)
        input_token_ids=list(request.prompt_token_ids),
        max_tokens=stopping.max_tokens,
        streaming=True,
        sampling_config=sampling_config(tllm, request, seed),
        output_config=output_config,
        end_id=-1 if stopping.ignore_eos else end_id,
        pad_id=end_id,
        return_all_generated_tokens=False,
        priority=executor_priority(request.priority),
    )


def finish_reason(tllm: ModuleType, reason: Any) -> FinishReason:
    """The executor's FinishReason of a final result -> ours."""
    fr = tllm.FinishReason
    if reason == fr.END_ID:
        return FinishReason.EOS
    if reason == fr.LENGTH:
        return FinishReason.LENGTH
    if reason == fr.STOP_WORDS:
        return FinishReason.STOP
    if reason == fr.TIMED_OUT:
        return FinishReason.DEADLINE
    if reason == fr.CANCELLED:
        return FinishReason.CANCELLED
    return FinishReason.ERROR  # NOT_FINISHED on a final result


def check_stop(stopping: StoppingCriteria, eos_token_ids: frozenset[int], detokenizer: IncrementalDetokenizer,
               num_output_tokens: int, token: int) -> tuple[FinishReason, str | int | None] | None:
    """After output token number `num_output_tokens` (1-based) = `token`: does the request stop?

    The reference engine's rule (engines/scheduler/scheduler.py `_check_stop`), applied to the
    executor's tokens: eos and stop token ids count only past min_tokens; other tokens go to the
    detokenizer, which matches stop strings; then max_tokens.
    """
    can_stop = num_output_tokens > stopping.min_tokens
    if can_stop and not stopping.ignore_eos and token in eos_token_ids:
        return FinishReason.EOS, None
    if can_stop and token in stopping.stop_token_ids:
        return FinishReason.STOP, token
    matched = detokenizer.append(token, can_stop)
    if matched is not None:
        return FinishReason.STOP, matched
    if num_output_tokens >= stopping.max_tokens:
        return FinishReason.LENGTH, None
    return None
