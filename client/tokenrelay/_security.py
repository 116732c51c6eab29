"""Channel security for Client, AsyncClient, the CLI and the load generator: TLS / mTLS
credentials, a server name override, the API key as `authorization: Bearer` metadata, and
optional OpenTelemetry client tracing (needs opentelemetry-instrumentation-grpc)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

import grpc

PemSource = str | bytes | os.PathLike[str] | None  # a PEM file path, or the PEM bytes themselves


def _pem(source: PemSource) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    with open(source, "rb") as handle:
        return handle.read()


@dataclass(slots=True, frozen=True)
class ChannelSecurity:
    tls: bool = False  # TLS with the system roots unless ca_cert is given
    ca_cert: PemSource = None
    client_cert: PemSource = None  # mTLS: this certificate chain ...
    client_key: PemSource = None  # ... and its key
    server_name: str | None = None  # expected name in the server certificate (grpc.ssl_target_name_override)
    api_key: str | None = None

    def __post_init__(self) -> None:
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together")

    @property
    def uses_tls(self) -> bool:
        return self.tls or any(v is not None for v in (self.ca_cert, self.client_cert, self.server_name))

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.uses_tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=_pem(self.ca_cert),
                                            private_key=_pem(self.client_key),
                                            certificate_chain=_pem(self.client_cert))

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()


def _otel_grpc() -> Any:
    try:
        from opentelemetry.instrumentation import grpc as otel_grpc
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ValueError("tracing=True needs opentelemetry-instrumentation-grpc "
                         "(pip install 'tokenrelay-client[tracing]')") from exc
    return otel_grpc


def tracing_interceptors() -> list[Any]:
    """OpenTelemetry grpc.aio client interceptors (the global tracer provider; they send the
    current trace as W3C traceparent)."""
    interceptors: list[Any] = _otel_grpc().aio_client_interceptors()
    return interceptors


def traced_channel(channel: grpc.Channel) -> grpc.Channel:
    """`channel` with OpenTelemetry's blocking client interceptor."""
    otel_grpc = _otel_grpc()
    from opentelemetry.instrumentation.grpc import grpcext

    traced: grpc.Channel = grpcext.intercept_channel(  # type: ignore[no-untyped-call]
        channel, otel_grpc.client_interceptor())
    return traced


def add_security_arguments(group: Any) -> None:
    """--tls, --ca-cert, --client-cert, --client-key, --server-name, --api-key on a parser/group."""
    group.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    group.add_argument("--ca-cert", default=None, help="PEM file of root certificates (implies --tls)")
    group.add_argument("--client-cert", default=None, help="PEM client certificate for mTLS (with --client-key)")
    group.add_argument("--client-key", default=None, help="PEM private key of --client-cert")
    group.add_argument("--server-name", default=None,
                       help="name expected in the server certificate, if not the target host (implies --tls)")
    group.add_argument("--api-key", default=os.environ.get("TOKENRELAY_API_KEY") or None,
                       help="API key sent as 'authorization: Bearer KEY' (default: env TOKENRELAY_API_KEY)")


def security_from_args(args: argparse.Namespace) -> ChannelSecurity:
    return ChannelSecurity(tls=bool(getattr(args, "tls", False)), ca_cert=getattr(args, "ca_cert", None),
                           client_cert=getattr(args, "client_cert", None),
                           client_key=getattr(args, "client_key", None),
                           server_name=getattr(args, "server_name", None), api_key=getattr(args, "api_key", None))
