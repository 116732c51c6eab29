"""TLS / mTLS server credentials that follow their files without a restart.

gRPC asks `ServerCertificates.fetch` for the certificate configuration at each new TLS
handshake (grpc.dynamic_ssl_server_credentials); it answers None ("unchanged") unless a file
changed since the last load or `reload()` was called (SIGHUP). Connections already open keep
the session they have: nothing is dropped. A half-written or mismatched pair is refused with
one log line and the previous certificates stay in force.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)


@dataclass(slots=True, frozen=True)
class TlsConfig:
    cert_file: str = ""  # PEM certificate chain of the server
    key_file: str = ""  # its PEM private key
    client_ca_file: str = ""  # PEM roots; when set, clients must present a certificate they sign

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("--tls-cert-file and --tls-key-file go together")
        if self.client_ca_file and not self.cert_file:
            raise ValueError("--tls-client-ca-file needs --tls-cert-file and --tls-key-file")

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


class ServerCertificates:
    """Owns the certificate configuration in force and decides when to load a new one."""

    def __init__(self, config: TlsConfig) -> None:
        if not config.enabled:
            raise ValueError("TLS is not configured")
        self.config = config
        self._lock = threading.Lock()  # fetch runs on gRPC's threads
        self._forced = False
        self.reloads = 0
        self._stamp = self._stat()
        self._initial = self._load()  # raises: a server must not start with bad certificates

    @property
    def _paths(self) -> tuple[str, ...]:
        c = self.config
        return tuple(p for p in (c.cert_file, c.key_file, c.client_ca_file) if p)

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in self._paths:
            try:
                st = os.stat(path)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append((0, 0, 0))
        return tuple(out)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        c = self.config
        try:
            ssl.create_default_context().load_cert_chain(c.cert_file, c.key_file)  # pair must match
        except ssl.SSLError as exc:
            raise ValueError(f"TLS certificate {c.cert_file} and key {c.key_file} do not load as a pair: "
                             f"{exc.reason or exc}") from None
        roots = _read(c.client_ca_file) if c.client_ca_file else None
        if roots is not None and b"-----BEGIN CERTIFICATE-----" not in roots:
            raise ValueError(f"{c.client_ca_file}: no PEM certificate in the client CA file")
        return grpc.ssl_server_certificate_configuration(
            [(_read(c.key_file), _read(c.cert_file))], root_certificates=roots)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self.fetch, require_client_authentication=bool(self.config.client_ca_file))

    def reload(self) -> None:
        """Load the files again at the next handshake (SIGHUP)."""
        with self._lock:
            self._forced = True

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate configuration fetcher: a new configuration, or None to keep it."""
        with self._lock:
            stamp = self._stat()
            if stamp == self._stamp and not self._forced:
                return None
            try:
                loaded = self._load()
            except (OSError, ValueError) as exc:
                log.error("TLS certificates not reloaded, keeping the previous ones: %s", exc)
                self._stamp, self._forced = stamp, False  # try again when the files change again
                return None
            self._stamp, self._forced = stamp, False
            self.reloads += 1
        log.info("TLS certificates reloaded from %s", self.config.cert_file)
        return loaded
