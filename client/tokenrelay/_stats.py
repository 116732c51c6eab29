"""Pure statistics for the load generator: per-request records -> one sweep point's summary.

No I/O, no clocks: everything here is a function of the recorded timestamps, so it is unit
tested exactly. Times are seconds; summaries report milliseconds where named `_ms`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 95, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default); NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError("q must be in [0, 100]")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def parse_percentiles(text: str) -> tuple[float, ...]:
    """"50,90,99" -> (50.0, 90.0, 99.0): the percentiles a report shows (vLLM's
    --metric-percentiles)."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated percentiles, got {text!r}") from None
    if not values or any(not 0 <= q <= 100 for q in values):
        raise ValueError(f"percentiles must be in [0, 100], got {text!r}")
    return tuple(sorted(set(values)))


def percentile_label(q: float) -> str:
    return f"p{q:g}"


@dataclass(slots=True, frozen=True)
class Summary:
    """Distribution of one metric, in milliseconds. p50..p99 are always there; `percentiles`
    holds the (q, value) pairs a run asked for."""

    count: int
    mean: float
    std: float  # population standard deviation (numpy's default, as vLLM reports it)
    p50: float
    p90: float
    p95: float
    p99: float
    min: float
    max: float
    percentiles: tuple[tuple[float, float], ...] = ()

    @classmethod
    def of_seconds(cls, values: Iterable[float], percentiles: Sequence[float] = PERCENTILES) -> Summary:
        ms = [v * 1000.0 for v in values]
        if not ms:
            return cls(0, *([math.nan] * 8), percentiles=tuple((q, math.nan) for q in percentiles))
        mean = sum(ms) / len(ms)
        std = math.sqrt(sum((v - mean) ** 2 for v in ms) / len(ms))
        p50, p90, p95, p99 = (percentile(ms, q) for q in PERCENTILES)
        chosen = tuple((float(q), percentile(ms, q)) for q in percentiles)
        return cls(len(ms), mean, std, p50, p90, p95, p99, min(ms), max(ms), chosen)

    def at(self, q: float) -> float:
        """The q-th percentile if this summary holds it."""
        for held, value in self.percentiles:
            if held == q:
                return value
        standard = {50.0: self.p50, 90.0: self.p90, 95.0: self.p95, 99.0: self.p99}
        if float(q) in standard:
            return standard[float(q)]
        raise KeyError(f"percentile {q:g} was not computed")


@dataclass(slots=True)
class RequestRecord:
    """What one benchmark request saw, on a perf_counter clock (seconds)."""

    start: float  # when the request was sent
    end: float  # when its stream ended (or failed)
    prompt_tokens: int
    token_times: list[float] = field(default_factory=list)  # arrival of each delta with tokens
    output_tokens: int = 0
    error: str = ""  # status code name when the request failed; "" when it succeeded

    def __post_init__(self) -> None:
        if self.end < self.start:
            raise ValueError("a request cannot end before it starts")

    @property
    def ok(self) -> bool:
        return not self.error and self.output_tokens > 0

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def itls(self) -> list[float]:
        """Gaps between successive token arrivals (one per delta after the first)."""
        times = self.token_times
        return [b - a for a, b in zip(times, times[1:])]

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (e2e - ttft) / (n - 1); None for n < 2."""
        ttft = self.ttft
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - ttft) / (self.output_tokens - 1)

    def meets_slo(self, slo_ttft: float | None, slo_tpot: float | None) -> bool:
        if not self.ok:
            return False
        ttft, tpot = self.ttft, self.tpot
        if slo_ttft is not None and (ttft is None or ttft > slo_ttft):
            return False
        return slo_tpot is None or tpot is None or tpot <= slo_tpot


@dataclass(slots=True, frozen=True)
class PointResult:
    """One sweep point (a concurrency or a request rate)."""

    mode: str  # "concurrency" or "rate"
    value: float
    completed: int
    failed: int
    duration_s: float
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    input_throughput: float  # prompt tokens / s (completed requests)
    total_token_throughput: float  # (prompt + output tokens) / s of completed requests
    goodput: float | None  # requests / s meeting every SLO; None without SLOs
    ttft: Summary
    itl: Summary
    tpot: Summary
    e2e: Summary
    errors: dict[str, int]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def summarize_point(mode: str, value: float, records: Sequence[RequestRecord], duration_s: float,
                    *, slo_ttft: float | None = None, slo_tpot: float | None = None,
                    percentiles: Sequence[float] = PERCENTILES) -> PointResult:
    """Aggregate one point's records. SLOs in seconds. `duration_s` is the point's wall time;
    `percentiles` the ones every latency summary reports."""
    if duration_s <= 0:
        raise ValueError("duration_s must be > 0")
    done = [r for r in records if r.ok]
    errors = Counter(r.error or "EMPTY_OUTPUT" for r in records if not r.ok)
    goodput = None
    if slo_ttft is not None or slo_tpot is not None:
        goodput = sum(r.meets_slo(slo_ttft, slo_tpot) for r in done) / duration_s
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    qs = tuple(percentiles)
    return PointResult(
        mode=mode, value=value, completed=len(done), failed=len(records) - len(done),
        duration_s=duration_s,
        request_throughput=len(done) / duration_s,
        output_throughput=output_tokens / duration_s,
        input_throughput=input_tokens / duration_s,
        total_token_throughput=(input_tokens + output_tokens) / duration_s,
        goodput=goodput,
        ttft=Summary.of_seconds((r.ttft for r in done if r.ttft is not None), qs),
        itl=Summary.of_seconds((gap for r in done for gap in r.itls), qs),
        tpot=Summary.of_seconds((t for r in done if (t := r.tpot) is not None), qs),
        e2e=Summary.of_seconds((r.e2e for r in done), qs),
        errors=dict(sorted(errors.items())),
    )
