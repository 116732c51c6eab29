"""`tokenrelay bench --plot DIR`: PNG plots of a bench report (matplotlib, an optional extra:
`pip install 'tokenrelay-client[plot]'`).

- `latency_distributions.png`: TTFT, ITL and E2E as empirical CDFs, one line per sweep point;
- `throughput_vs_concurrency.png` / `throughput_vs_rate.png`: request throughput and goodput
  (req/s), output and total token throughput (tok/s) against the sweep's x;
- `latency_vs_concurrency.png` / `latency_vs_rate.png`: the run's percentiles of TTFT, ITL and
  E2E against the sweep's x.

Figures are built with matplotlib's object API (no pyplot state), so plotting is safe in any
process and needs no display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenrelay._report import point_label
from tokenrelay._stats import PointResult, RequestRecord, Summary, percentile_label

try:
    from matplotlib.figure import Figure
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("--plot needs matplotlib: pip install 'tokenrelay-client[plot]'") from exc

if TYPE_CHECKING:
    from tokenrelay.loadgen import BenchReport

_DPI = 110
_METRICS = (("TTFT", "ttft"), ("ITL", "itl"), ("E2E", "e2e"))
_AXIS = {"concurrency": "concurrency (requests in flight)", "rate": "request rate (req/s)"}


def _samples_ms(records: Sequence[RequestRecord], metric: str) -> list[float]:
    done = [r for r in records if r.ok]
    if metric == "ttft":
        values = [r.ttft for r in done if r.ttft is not None]
    elif metric == "itl":
        values = [gap for r in done for gap in r.itls]
    else:
        values = [r.e2e for r in done]
    return sorted(v * 1000.0 for v in values)


def _latency_distributions(report: BenchReport, path: Path) -> Path:
    figure = Figure(figsize=(15, 4.5), dpi=_DPI, layout="constrained")
    axes = figure.subplots(1, len(_METRICS))
    for ax, (title, metric) in zip(axes, _METRICS, strict=True):
        for point, records in zip(report.points, report.records, strict=True):
            values = _samples_ms(records, metric)
            if values:
                fractions = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, fractions, where="post", label=point_label(point))
        ax.set_title(f"{title} distribution")
        ax.set_xlabel(f"{title} (ms)")
        ax.set_ylabel("fraction of samples <= x")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.suptitle(f"tokenrelay bench: {report.target} ({report.model.get('model_name', '')})")
    figure.savefig(path)
    return path


def _throughput(points: Sequence[PointResult], mode: str, path: Path) -> Path:
    xs = [p.value for p in points]
    figure = Figure(figsize=(12, 4.5), dpi=_DPI, layout="constrained")
    requests_ax, tokens_ax = figure.subplots(1, 2)
    requests_ax.plot(xs, [p.request_throughput for p in points], "o-", label="request throughput")
    if any(p.goodput is not None for p in points):
        requests_ax.plot(xs, [p.goodput if p.goodput is not None else float("nan") for p in points],
                         "s--", label="goodput (meets SLOs)")
    requests_ax.set_ylabel("requests / s")
    tokens_ax.plot(xs, [p.output_throughput for p in points], "o-", label="output tokens")
    tokens_ax.plot(xs, [p.total_token_throughput for p in points], "s--", label="total tokens (in + out)")
    tokens_ax.set_ylabel("tokens / s")
    for ax, title in ((requests_ax, "request throughput and goodput"), (tokens_ax, "token throughput")):
        ax.set_title(f"{title} vs {mode}")
        ax.set_xlabel(_AXIS[mode])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.savefig(path)
    return path


def _latency_vs_load(points: Sequence[PointResult], mode: str, path: Path) -> Path:
    xs = [p.value for p in points]
    figure = Figure(figsize=(15, 4.5), dpi=_DPI, layout="constrained")
    axes = figure.subplots(1, len(_METRICS))
    for ax, (title, metric) in zip(axes, _METRICS, strict=True):
        summaries: list[Summary] = [getattr(p, metric) for p in points]
        for q, _ in summaries[0].percentiles:
            ax.plot(xs, [s.at(q) for s in summaries], "o-", label=percentile_label(q))
        ax.plot(xs, [s.mean for s in summaries], "k:", label="mean")
        ax.set_title(f"{title} vs {mode}")
        ax.set_xlabel(_AXIS[mode])
        ax.set_ylabel(f"{title} (ms)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.savefig(path)
    return path


def write_plots(report: BenchReport, directory: str | Path) -> list[Path]:
    """Write the report's PNGs into `directory` (created if missing); returns their paths."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = [_latency_distributions(report, out / "latency_distributions.png")]
    for mode in ("concurrency", "rate"):
        points: list[Any] = sorted((p for p in report.points if p.mode == mode), key=lambda p: p.value)
        if points:
            written.append(_throughput(points, mode, out / f"throughput_vs_{mode}.png"))
            written.append(_latency_vs_load(points, mode, out / f"latency_vs_{mode}.png"))
    return written
