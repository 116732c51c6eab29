"""API-key authentication and per-tenant caps against a real server."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tokenrelay_server.auth import AuthConfig, key_digest
from tokenrelay_server.security import SecurityConfig
from tokenrelay_server.tls import TlsConfig
from tests.integration.certs import make_ca, make_client_cert, make_server_cert
from tokenrelay import AsyncClient, NotFoundError, ResourceExhaustedError, UnauthenticatedError

ALICE_KEY = "tr-alice-7f3c9a1e5b"
BOB_KEY = "tr-bob-2d8e4f6a0c"


def write_keys(path: Path, **tenants: dict) -> Path:
    path.write_text(json.dumps({
        "keys": {key_digest(ALICE_KEY): "alice", key_digest(BOB_KEY): "bob"},
        "tenants": tenants,
    }))
    return path


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return write_keys(tmp_path / "keys.json", alice={"max_in_flight_requests": 1, "max_queued_jobs": 2})


def _auth(keys_file: Path, **kw) -> SecurityConfig:
    return SecurityConfig(auth=AuthConfig(api_keys_file=str(keys_file), **kw))


async def test_missing_or_wrong_key_is_unauthenticated(synthetic_server_factory, keys_file, caplog) -> None:
    srv = await synthetic_server_factory(security=_auth(keys_file))
    caplog.set_level(logging.DEBUG)
    async with AsyncClient(srv.address, timeout=5, retries=0) as anonymous:
        for call in (lambda: anonymous.generate("hi", max_tokens=2), anonymous.info,
                     lambda: anonymous.list_jobs()):
            with pytest.raises(UnauthenticatedError):
                await call()
    async with AsyncClient(srv.address, timeout=5, retries=0, api_key="tr-not-a-key") as wrong:
        with pytest.raises(UnauthenticatedError, match="unknown API key"):
            await wrong.generate("hi", max_tokens=2)
        with pytest.raises(UnauthenticatedError):
            await wrong.get("job_0123")
    async with AsyncClient(srv.address, timeout=5, retries=0, metadata={"authorization": "Basic abc"}) as basic:
        with pytest.raises(UnauthenticatedError, match="Bearer"):
            await basic.info()
    async with AsyncClient(srv.address, timeout=5, retries=0, api_key=ALICE_KEY) as alice:
        assert (await alice.generate("hi", max_tokens=2)).usage.completion_tokens == 2
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "tr-not-a-key" not in logged and ALICE_KEY not in logged


async def test_health_is_open_and_reflection_open_unless_configured(synthetic_server_factory, keys_file) -> None:
    async def reflection_list(address: str) -> list[str]:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                timeout=5)
            return [s.name async for r in replies for s in r.list_services_response.service]

    srv = await synthetic_server_factory(security=_auth(keys_file))
    async with grpc.aio.insecure_channel(srv.address) as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert "tokenrelay.v1.TextGenerationService" in await reflection_list(srv.address)

    closed = await synthetic_server_factory(security=_auth(keys_file, reflection_requires_auth=True))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await reflection_list(closed.address)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("method", ["generate", "stream"])
async def test_tenant_over_its_cap_is_refused_while_another_is_served(
        synthetic_server_factory, keys_file, wait_until, method) -> None:
    srv = await synthetic_server_factory(security=_auth(keys_file), ttft_ms=5.0, itl_ms=20.0)
    async with AsyncClient(srv.address, timeout=30, retries=0, api_key=ALICE_KEY) as alice, \
            AsyncClient(srv.address, timeout=30, retries=0, api_key=BOB_KEY) as bob:
        long = asyncio.create_task(alice.generate("long one", max_tokens=200, ignore_eos=True))
        await wait_until(lambda: srv.handle.security.limiter.in_flight("alice") == 1)
        with pytest.raises(ResourceExhaustedError) as err:
            if method == "generate":
                await alice.generate("second", max_tokens=2)
            else:
                async for _ in alice.stream("second", max_tokens=2):
                    pass
        assert err.value.retry_delay is not None and err.value.retry_delay > 0
        info = err.value.error_info
        assert info is not None and info.reason == "TENANT_QUOTA_EXCEEDED"
        assert info.metadata["tenant"] == "alice" and info.metadata["limit"] == "max_in_flight_requests"
        # Bob (no cap) is served at the same time, several at once.
        results = await asyncio.gather(*(bob.generate(f"bob {i}", max_tokens=2) for i in range(3)))
        assert all(r.usage.completion_tokens == 2 for r in results)
        assert not long.done()
        long.cancel()
        with pytest.raises(BaseException):
            await long
        await wait_until(lambda: srv.handle.security.limiter.in_flight("alice") == 0)
        assert (await alice.generate("now fine", max_tokens=2)).usage.completion_tokens == 2


async def test_client_certificate_names_the_tenant(synthetic_server_factory, tmp_path) -> None:
    ca = make_ca()
    cert, key = make_server_cert(ca, "tokenrelay.test").write(tmp_path, "server")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    security = SecurityConfig(tls=TlsConfig(cert_file=str(cert), key_file=str(key),
                                            client_ca_file=str(tmp_path / "ca.crt")),
                              auth=AuthConfig(tenant_from_client_cert=True))
    srv = await synthetic_server_factory(security=security)
    carol = make_client_cert(ca, "carol")
    async with AsyncClient(srv.address, ca_cert=ca.cert_pem, client_cert=carol.cert_pem, client_key=carol.key_pem,
                           server_name="tokenrelay.test", timeout=10, retries=0) as client:
        assert (await client.generate("hi", max_tokens=2)).usage.completion_tokens == 2
        submitted = (await client.submit("job", max_tokens=2)).job
        listed = await client.list_jobs()
        assert [j.job_id for j in listed.jobs] == [submitted.job_id]
    dave = make_client_cert(ca, "dave")
    async with AsyncClient(srv.address, ca_cert=ca.cert_pem, client_cert=dave.cert_pem, client_key=dave.key_pem,
                           server_name="tokenrelay.test", timeout=10, retries=0) as other:
        assert list((await other.list_jobs()).jobs) == []
        with pytest.raises(NotFoundError):
            await other.get(submitted.job_id)


def test_keys_file_errors_are_clear(tmp_path) -> None:
    from tokenrelay_server.auth import ApiKeys

    bad = tmp_path / "bad.json"
    for text, match in (("{", "not JSON"), ('{"keys": []}', "keys"), ('{"keys": {"abc": "x"}}', "SHA-256"),
                        (json.dumps({"keys": {key_digest("k"): ""}}), "tenant"),
                        (json.dumps({"keys": {}, "tenants": {"a": {"max_in_flight_requests": -1}}}), ">= 0"),
                        (json.dumps({"keys": {}, "tenants": {"a": {"burst": 1}}}), "unknown limits"),
                        (json.dumps({"keys": {}, "extra": 1}), "unknown fields")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            ApiKeys.load(str(bad))
    good = write_keys(tmp_path / "good.json", bob={"max_queued_jobs": 3})
    keys = ApiKeys.load(str(good))
    assert keys.tenant_for(ALICE_KEY) == "alice" and keys.tenant_for(BOB_KEY) == "bob"
    assert keys.tenant_for("nope") is None and keys.tenant_for("") is None
    assert keys.limits_for("bob").max_queued_jobs == 3 and keys.limits_for("alice").max_queued_jobs == 0


async def test_metrics_tenant_labels_when_enabled(synthetic_server_factory, keys_file) -> None:
    from tokenrelay_server.telemetry.config import TelemetryConfig
    from tests.integration.test_metrics import scrape, value

    srv = await synthetic_server_factory(security=_auth(keys_file),
                                         telemetry=TelemetryConfig(metrics_port=0, metrics_tenant_labels=True))
    async with AsyncClient(srv.address, timeout=10, retries=0, api_key=BOB_KEY) as bob:
        await bob.generate("hi", max_tokens=2)
    async with AsyncClient(srv.address, timeout=10, retries=0) as anonymous:
        with pytest.raises(UnauthenticatedError):
            await anonymous.info()
    m = await asyncio.to_thread(scrape, srv.handle.telemetry.metrics_port)
    assert value(m, "tokenrelay:grpc_server_handled_total", grpc_method="Generate", tenant="bob", grpc_code="OK") == 1
    assert value(m, "tokenrelay:grpc_server_handled_total", grpc_method="GetModelInfo", tenant="",
                 grpc_code="UNAUTHENTICATED") == 1
