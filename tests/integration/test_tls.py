"""TLS and mTLS on the serving port with certificates made in the test; the plaintext health
port; certificate reload without dropping connections."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenrelay_server.security import SecurityConfig
from tokenrelay_server.tls import TlsConfig
from tests.integration.certs import make_ca, make_client_cert, make_server_cert
from tokenrelay import AsyncClient, UnavailableError

SERVER_NAME = "tokenrelay.test"


@pytest.fixture
def pki(tmp_path: Path) -> dict:
    ca = make_ca()
    server = make_server_cert(ca, SERVER_NAME)
    cert, key = server.write(tmp_path, "server")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    alice = make_client_cert(ca, "alice")
    return {"ca": ca, "cert": cert, "key": key, "ca_file": tmp_path / "ca.crt", "alice": alice, "dir": tmp_path}


def _client(address: str, ca_pem: bytes, **kw) -> AsyncClient:
    return AsyncClient(address, ca_cert=ca_pem, server_name=SERVER_NAME, timeout=10, retries=0, **kw)


async def test_tls_serves_and_plaintext_is_refused(synthetic_server_factory, pki) -> None:
    security = SecurityConfig(tls=TlsConfig(cert_file=str(pki["cert"]), key_file=str(pki["key"])), health_port=0)
    srv = await synthetic_server_factory(security=security)
    async with _client(srv.address, pki["ca"].cert_pem) as client:
        result = await client.generate("hello", max_tokens=4, temperature=0)
        assert result.usage.completion_tokens == 4
    # The serving port speaks only TLS: a plaintext client cannot even connect.
    async with AsyncClient(srv.address, timeout=3, retries=0) as plain:
        with pytest.raises(UnavailableError):
            await plain.generate("hello", max_tokens=1)
    # The health port answers in plain text (Kubernetes gRPC probes cannot do TLS)...
    health_port = srv.handle.security.health_port
    assert health_port and health_port != srv.port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service="tokenrelay.v1.TextGenerationService"),
                                 timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # ... and serves nothing but health.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await ch.unary_unary("/tokenrelay.v1.TextGenerationService/GetModelInfo")(b"", timeout=5)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_mtls_requires_a_client_certificate(synthetic_server_factory, pki) -> None:
    security = SecurityConfig(tls=TlsConfig(cert_file=str(pki["cert"]), key_file=str(pki["key"]),
                                            client_ca_file=str(pki["ca_file"])))
    srv = await synthetic_server_factory(security=security)
    alice = pki["alice"]
    async with _client(srv.address, pki["ca"].cert_pem, client_cert=alice.cert_pem,
                       client_key=alice.key_pem) as client:
        assert (await client.generate("hi", max_tokens=2)).usage.completion_tokens == 2
    async with _client(srv.address, pki["ca"].cert_pem) as no_cert:
        with pytest.raises(UnavailableError):
            await no_cert.generate("hi", max_tokens=2)
    other_ca = make_ca("someone else's CA")
    stranger = make_client_cert(other_ca, "mallory")
    async with _client(srv.address, pki["ca"].cert_pem, client_cert=stranger.cert_pem,
                       client_key=stranger.key_pem) as wrong_ca:
        with pytest.raises(UnavailableError):
            await wrong_ca.generate("hi", max_tokens=2)


async def test_certificates_reload_on_file_change_without_dropping_connections(
        synthetic_server_factory, pki) -> None:
    security = SecurityConfig(tls=TlsConfig(cert_file=str(pki["cert"]), key_file=str(pki["key"])))
    srv = await synthetic_server_factory(security=security)
    old_ca = pki["ca"]
    async with _client(srv.address, old_ca.cert_pem) as kept:
        assert (await kept.generate("before", max_tokens=2)).usage.completion_tokens == 2
        # Rotate to a certificate from a new CA: write aside, then rename over (atomic, as
        # Kubernetes secret updates are).
        new_ca = make_ca("rotated CA")
        rotated = make_server_cert(new_ca, SERVER_NAME)
        staged_cert, staged_key = rotated.write(pki["dir"], "staged")
        os.replace(staged_key, pki["key"])
        os.replace(staged_cert, pki["cert"])
        async with _client(srv.address, new_ca.cert_pem) as fresh:
            assert (await fresh.generate("after", max_tokens=2)).usage.completion_tokens == 2
        assert srv.handle.security.certificates.reloads == 1
        # The connection opened before the rotation still works.
        stream = kept.stream("still here", max_tokens=3)
        assert len([d async for d in stream]) >= 1
        assert (await kept.generate("again", max_tokens=2)).usage.completion_tokens == 2
    # New clients that trust only the old CA are refused now.
    async with _client(srv.address, old_ca.cert_pem) as stale:
        with pytest.raises(UnavailableError):
            await stale.generate("x", max_tokens=1)


async def test_a_broken_rotation_keeps_the_certificate_in_force(synthetic_server_factory, pki) -> None:
    security = SecurityConfig(tls=TlsConfig(cert_file=str(pki["cert"]), key_file=str(pki["key"])))
    srv = await synthetic_server_factory(security=security)
    other = make_server_cert(make_ca("other"), SERVER_NAME)
    pki["key"].write_bytes(other.key_pem)  # the key no longer matches the certificate
    async with _client(srv.address, pki["ca"].cert_pem) as client:
        assert (await client.generate("hi", max_tokens=2)).usage.completion_tokens == 2
    assert srv.handle.security.certificates.reloads == 0


def test_bad_tls_files_refuse_to_start(pki) -> None:
    from tokenrelay_server.security import Security

    with pytest.raises(ValueError, match="go together"):
        TlsConfig(cert_file=str(pki["cert"]))
    wrong_key = make_server_cert(make_ca("x"), SERVER_NAME)
    key = pki["dir"] / "wrong.key"
    key.write_bytes(wrong_key.key_pem)
    with pytest.raises(ValueError, match="do not load as a pair"):
        Security(SecurityConfig(tls=TlsConfig(cert_file=str(pki["cert"]), key_file=str(key))))
    with pytest.raises(OSError):
        Security(SecurityConfig(tls=TlsConfig(cert_file=str(pki["cert"]), key_file=str(pki["dir"] / "none.key"))))


async def test_health_port_serves_plaintext_next_to_a_plaintext_server(synthetic_server_factory) -> None:
    srv = await synthetic_server_factory(security=SecurityConfig(health_port=0))
    port = srv.handle.security.health_port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await srv.handle.drain(0.1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="tokenrelay.v1.TextGenerationService"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
