"""Admission rules a request must pass against the loaded model and KV pool: one table.

Field-level rules live with the domain types in `engines/base.py`: the ranges of sampling values
are one table there (`SAMPLING_RANGES`), applied by `SamplingParams` itself and, for proto input,
by the edge (`server/convert.py`), which reports every bad field at once. What depends on the model and the pool lives here, checked
once at admission by whichever engine front end takes the request (in-process or engine-core
client), never on the engine loop, where a failure would kill the engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tokenrelay_engines.base import InvalidRequest, ModelInfo, Request


@dataclass(slots=True, frozen=True)
class EngineLimits:
    info: ModelInfo  # context_length already capped by max_model_len
    num_blocks: int
    block_size: int

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


def _prompt_ids(r: Request, lim: EngineLimits) -> str | None:
    vocab = lim.info.vocab_size
    if any(not 0 <= t < vocab for t in r.prompt_token_ids):
        return f"token ids must be in [0, {vocab})"
    return None


def _prompt_len(r: Request, lim: EngineLimits) -> str | None:
    n, ctx = len(r.prompt_token_ids), lim.info.context_length
    return f"{n} tokens leave no room in the {ctx}-token context" if n >= ctx else None


def _total_len(r: Request, lim: EngineLimits) -> str | None:
    n, m, ctx = len(r.prompt_token_ids), r.stopping.max_tokens, lim.info.context_length
    return f"prompt ({n}) + max_tokens ({m}) exceeds the context ({ctx})" if n + m > ctx else None


def _kv_capacity(r: Request, lim: EngineLimits) -> str | None:
    total = len(r.prompt_token_ids) + r.stopping.max_tokens
    if lim.blocks_for(total) > lim.num_blocks:
        return f"prompt + max_tokens ({total} tokens) exceeds the KV cache capacity"
    return None


def _logprobs(r: Request, lim: EngineLimits) -> str | None:
    n = r.sampling.logprobs
    return f"must be <= {lim.info.max_logprobs}" if n is not None and n > lim.info.max_logprobs else None


def _stop_strings(r: Request, lim: EngineLimits) -> str | None:
    cap = lim.info.max_stop_strings
    return f"at most {cap} stop strings" if len(r.stopping.stop) > cap else None


def _stop_token_ids(r: Request, lim: EngineLimits) -> str | None:
    vocab = lim.info.vocab_size
    if any(not 0 <= t < vocab for t in r.stopping.stop_token_ids):
        return f"token ids must be in [0, {vocab})"
    return None


# (field, rule): checked in order; the first failing rule is reported.
RULES: tuple[tuple[str, Callable[[Request, EngineLimits], str | None]], ...] = (
    ("prompt", _prompt_ids),
    ("prompt", _prompt_len),
    ("stopping.max_tokens", _total_len),
    ("stopping.max_tokens", _kv_capacity),
    ("logprobs", _logprobs),
    ("stopping.stop", _stop_strings),
    ("stopping.stop_token_ids", _stop_token_ids),
)


def check_request(request: Request, limits: EngineLimits) -> None:
    """Raise InvalidRequest for the first rule `request` breaks."""
    for field_name, rule in RULES:
        message = rule(request, limits)
        if message is not None:
            raise InvalidRequest(field_name, message)
