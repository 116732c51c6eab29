"""Merging output deltas: what a consumer that lags receives instead of a queue of deltas.

Every engine's request stream hands its consumer everything that arrived since the previous
read as ONE delta (the torch engine's output slot, the synthetic engine's stream), so the gRPC
front end sends at most one message per read and never one per token when it lags.
"""

from __future__ import annotations

from tokenrelay_engines.base import RequestOutput


def merge_outputs(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One delta equivalent to `first` followed by `later`."""
    first.token_ids.extend(later.token_ids)
    first.text += later.text
    if later.logprobs is not None:
        first.logprobs = (first.logprobs or []) + later.logprobs
    if first.seed is None:
        first.seed = later.seed
    if later.finished:
        first.finished = True
        first.finish_reason = later.finish_reason
        first.stop_reason = later.stop_reason
        first.usage = later.usage
        first.metrics = later.metrics
        first.error = later.error
        first.seed = later.seed if later.seed is not None else first.seed
    return first
