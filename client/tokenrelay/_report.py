"""Load generator output: a hand-written progress bar (stderr) and result tables (stdout)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TextIO

from tokenrelay._stats import PointResult, Summary, percentile_label


class ProgressBar:
    """One-line progress on a text stream, redrawn at most every `interval` seconds.

    With a known request total the bar fills by requests; otherwise by elapsed/duration."""

    def __init__(self, label: str, stream: TextIO, *, total: int | None, duration: float | None,
                 enabled: bool = True, width: int = 30, interval: float = 0.1) -> None:
        self.label = label
        self.stream = stream
        self.total = total
        self.duration = duration
        self.enabled = enabled
        self.width = width
        self.interval = interval
        self.ok = 0
        self.failed = 0
        self._start = time.monotonic()
        self._last_draw = -math.inf

    def update(self, ok: bool) -> None:
        if ok:
            self.ok += 1
        else:
            self.failed += 1
        now = time.monotonic()
        if now - self._last_draw >= self.interval:
            self._draw(now)

    def _fraction(self, elapsed: float) -> float:
        fractions = []
        if self.total:
            fractions.append((self.ok + self.failed) / self.total)
        if self.duration:
            fractions.append(elapsed / self.duration)
        return min(1.0, max(fractions, default=0.0))

    def _draw(self, now: float, end: str = "") -> None:
        if not self.enabled:
            return
        self._last_draw = now
        elapsed = now - self._start
        filled = round(self._fraction(elapsed) * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        count = f"{self.ok + self.failed}" + (f"/{self.total}" if self.total else "")
        self.stream.write(f"\r{self.label} [{bar}] {count} ok={self.ok} failed={self.failed} "
                          f"{elapsed:6.1f}s{end}")
        self.stream.flush()

    def finish(self) -> None:
        self._draw(time.monotonic(), end="\n")


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def point_label(point: PointResult) -> str:
    if point.mode == "concurrency":
        return f"concurrency {int(point.value)}"
    return f"rate {point.value:g} req/s"


def format_point(point: PointResult) -> str:
    """A block for one sweep point: throughput lines and a latency table (ms): mean, standard
    deviation and the run's percentiles."""
    qs = [q for q, _ in point.ttft.percentiles]
    lines = [
        f"== {point_label(point)}: {point.completed} ok, {point.failed} failed "
        f"in {point.duration_s:.2f} s ==",
        f"request throughput {point.request_throughput:.2f} req/s   "
        f"output throughput {point.output_throughput:.1f} tok/s   "
        f"input throughput {point.input_throughput:.1f} tok/s",
        f"total token throughput {point.total_token_throughput:.1f} tok/s"
        + (f"   goodput {point.goodput:.2f} req/s" if point.goodput is not None else ""),
        f"{'latency (ms)':<14}{'mean':>10}{'std':>10}"
        + "".join(f"{percentile_label(q):>10}" for q in qs) + f"{'n':>8}",
    ]
    rows: Sequence[tuple[str, Summary]] = (
        ("TTFT", point.ttft), ("ITL", point.itl), ("TPOT", point.tpot), ("E2E", point.e2e))
    for name, s in rows:
        lines.append(f"{name:<14}{_fmt(s.mean):>10}{_fmt(s.std):>10}"
                     + "".join(f"{_fmt(value):>10}" for _, value in s.percentiles) + f"{s.count:>8}")
    if point.errors:
        lines.append("errors: " + ", ".join(f"{k}={v}" for k, v in point.errors.items()))
    return "\n".join(lines)


def format_sweep(points: Sequence[PointResult]) -> str:
    """One row per point, to compare the sweep at a glance."""
    header = (f"{'point':<22}{'ok':>6}{'fail':>6}{'req/s':>9}{'tok/s':>10}{'goodput':>9}"
              f"{'TTFT p50':>10}{'TTFT p99':>10}{'ITL p50':>9}{'TPOT p50':>10}{'E2E p99':>10}")
    lines = ["== sweep (latencies in ms) ==", header]
    for p in points:
        lines.append(f"{point_label(p):<22}{p.completed:>6}{p.failed:>6}"
                     f"{p.request_throughput:>9.2f}{p.output_throughput:>10.1f}"
                     f"{_fmt(p.goodput, 2):>9}{_fmt(p.ttft.p50):>10}{_fmt(p.ttft.p99):>10}"
                     f"{_fmt(p.itl.p50):>9}{_fmt(p.tpot.p50):>10}{_fmt(p.e2e.p99):>10}")
    return "\n".join(lines)
