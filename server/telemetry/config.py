"""Telemetry flags -> TelemetryConfig: Prometheus metrics, OpenTelemetry traces, logs."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

LOG_FORMATS = ("text", "json")


@dataclass(slots=True, frozen=True)
class TelemetryConfig:
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; 0: ephemeral; None: off
    metrics_tenant_labels: bool = False  # add a tenant label to per-call counters
    otlp_traces_endpoint: str = ""  # OTLP/gRPC collector, e.g. http://collector:4317; "": tracing off
    trace_sample_ratio: float = 1.0  # of root traces (a caller's sampled traceparent is followed)
    service_name: str = "tokenrelay"
    log_format: str = "text"
    access_log: bool = True  # one line per RPC

    def __post_init__(self) -> None:
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics port must be in [0, 65535], not {self.metrics_port}")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ValueError("trace sample ratio must be in [0, 1]")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log format must be one of {LOG_FORMATS}, not {self.log_format!r}")

    @property
    def metrics(self) -> bool:
        return self.metrics_port is not None

    @property
    def tracing(self) -> bool:
        return bool(self.otlp_traces_endpoint)


def add_telemetry_arguments(parser: argparse.ArgumentParser) -> None:
    d = TelemetryConfig()
    group = parser.add_argument_group("telemetry")
    group.add_argument("--metrics-port", type=int, default=-1,
                       help="serve Prometheus metrics at http://HOST:PORT/metrics; 0: ephemeral; -1: off")
    group.add_argument("--metrics-tenant-labels", action=argparse.BooleanOptionalAction,
                       default=d.metrics_tenant_labels, help="label per-call counters with the tenant")
    group.add_argument("--otlp-traces-endpoint", default=d.otlp_traces_endpoint,
                       help="export OpenTelemetry traces over OTLP/gRPC to this collector "
                            "(e.g. http://localhost:4317); empty: tracing off")
    group.add_argument("--trace-sample-ratio", type=float, default=d.trace_sample_ratio,
                       help="share of new traces sampled; a caller's traceparent decides for its trace")
    group.add_argument("--otel-service-name", default=d.service_name, help="service.name of exported spans")
    group.add_argument("--log-format", default=d.log_format, choices=LOG_FORMATS,
                       help="text, or json: one JSON object per line, with request and trace ids")
    group.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=d.access_log,
                       help="log one line per RPC: method, status, duration, tokens, ids")


def telemetry_config_from_args(args: argparse.Namespace) -> TelemetryConfig:
    return TelemetryConfig(metrics_port=None if args.metrics_port < 0 else args.metrics_port,
                           metrics_tenant_labels=args.metrics_tenant_labels,
                           otlp_traces_endpoint=args.otlp_traces_endpoint,
                           trace_sample_ratio=args.trace_sample_ratio, service_name=args.otel_service_name,
                           log_format=args.log_format, access_log=args.access_log)
