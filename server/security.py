"""The serving port's identity: TLS / mTLS, API-key authentication, tenants, the health port.

    parser = argparse.ArgumentParser(); add_security_arguments(parser)
    security = Security(security_config_from_args(args), retry_after_ms=200)
    server = grpc.aio.server(interceptors=security.interceptors())
    port = security.add_serving_port(server, "0.0.0.0:50051")  # TLS when configured
    await security.start_health_port(health_servicer, host)     # plaintext, health only
    security.reload()                                           # SIGHUP: certificates and keys
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2_grpc

from tokenrelay_server.auth import AuthConfig, Authenticator, AuthInterceptor
from tokenrelay_server.tenants import TenantLimiter
from tokenrelay_server.tls import ServerCertificates, TlsConfig

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class SecurityConfig:
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    health_port: int | None = None  # plaintext grpc.health.v1 only; 0: ephemeral; None: none

    def __post_init__(self) -> None:
        if self.health_port is not None and not 0 <= self.health_port <= 65535:
            raise ValueError(f"health port must be in [0, 65535], not {self.health_port}")
        if self.auth.tenant_from_client_cert and not self.tls.client_ca_file:
            raise ValueError("--tenant-from-client-cert needs --tls-client-ca-file (mTLS)")


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security")
    group.add_argument("--tls-cert-file", default="", help="PEM certificate chain: serve TLS on --port "
                       "(reloaded on SIGHUP or when the file changes)")
    group.add_argument("--tls-key-file", default="", help="PEM private key of --tls-cert-file")
    group.add_argument("--tls-client-ca-file", default="",
                       help="PEM roots: require client certificates signed by them (mTLS)")
    group.add_argument("--health-port", type=int, default=-1,
                       help="also serve grpc.health.v1 (only) in plain text on this port, for "
                            "Kubernetes probes; 0 picks an ephemeral port; -1: off")
    group.add_argument("--api-keys-file", default="",
                       help="JSON {keys: {sha256 hex: tenant}, tenants: {name: limits}}: require "
                            "'authorization: Bearer <key>' (reloaded on SIGHUP)")
    group.add_argument("--tenant-from-client-cert", action=argparse.BooleanOptionalAction, default=False,
                       help="with mTLS: a call without an API key is the tenant named by its client "
                            "certificate's common name")
    group.add_argument("--reflection-requires-auth", action=argparse.BooleanOptionalAction, default=False,
                       help="authenticate server reflection too (default: open)")


def security_config_from_args(args: argparse.Namespace) -> SecurityConfig:
    return SecurityConfig(
        tls=TlsConfig(cert_file=args.tls_cert_file, key_file=args.tls_key_file,
                      client_ca_file=args.tls_client_ca_file),
        auth=AuthConfig(api_keys_file=args.api_keys_file, tenant_from_client_cert=args.tenant_from_client_cert,
                        reflection_requires_auth=args.reflection_requires_auth),
        health_port=None if args.health_port < 0 else args.health_port)


class Security:
    """Owns the certificates, the authenticator, the tenant limiter and the health-only server."""

    def __init__(self, config: SecurityConfig, *, retry_after_ms: int = 200) -> None:
        self.config = config
        self.certificates = ServerCertificates(config.tls) if config.tls.enabled else None
        self.authenticator = Authenticator(config.auth) if config.auth.enabled else None
        self.limiter = TenantLimiter(retry_after_ms)
        self.health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None
        if self.authenticator is None:
            log.warning("authentication is off: any client can call every RPC and manage every job "
                        "(set --api-keys-file or --tenant-from-client-cert)")

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if self.authenticator is None:
            return []
        return [AuthInterceptor(self.authenticator, self.limiter)]

    def add_serving_port(self, server: grpc.aio.Server, address: str) -> int:
        if self.certificates is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.certificates.credentials())

    async def start_health_port(self, servicer: health_pb2_grpc.HealthServicer, host: str) -> None:
        """Serve `servicer` alone, in plain text, on the configured health port (if any)."""
        if self.config.health_port is None:
            return
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        bind = f"[{host}]" if ":" in host and not host.startswith("[") else host
        port = server.add_insecure_port(f"{bind}:{self.config.health_port}")
        if port == 0:
            raise OSError(f"could not bind the health port {host}:{self.config.health_port}")
        await server.start()
        self.health_server, self.health_port = server, port
        log.info("health-only port (plain text, grpc.health.v1) listening on %s:%d", host, port)

    def reload(self) -> None:
        """SIGHUP: certificates at the next handshake, API keys now."""
        if self.certificates is not None:
            self.certificates.reload()
        if self.authenticator is not None:
            self.authenticator.reload()

    async def stop(self, grace: float = 0.0) -> None:
        if self.health_server is not None:
            await self.health_server.stop(grace)
            self.health_server = None
