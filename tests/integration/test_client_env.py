"""Client defaults from the environment against a real server with mTLS and API keys: a
`Client()` / `AsyncClient()` built without arguments finds the target, the TLS files, the server
name and the API key in TOKENRELAY_* variables; explicit arguments win over them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.integration.certs import make_ca, make_client_cert, make_server_cert
from tests.integration.test_auth import ALICE_KEY, write_keys
from tokenrelay import AsyncClient, Client, UnauthenticatedError
from tokenrelay_server.auth import AuthConfig
from tokenrelay_server.security import SecurityConfig
from tokenrelay_server.tls import TlsConfig

SERVER_NAME = "tokenrelay.test"


@pytest.fixture
async def secured(synthetic_server_factory, tmp_path: Path, monkeypatch):
    ca = make_ca()
    cert, key = make_server_cert(ca, SERVER_NAME).write(tmp_path, "server")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    client_cert, client_key = make_client_cert(ca, "carol").write(tmp_path, "carol")
    security = SecurityConfig(
        tls=TlsConfig(cert_file=str(cert), key_file=str(key), client_ca_file=str(tmp_path / "ca.crt")),
        auth=AuthConfig(api_keys_file=str(write_keys(tmp_path / "keys.json"))))
    server = await synthetic_server_factory(security=security)
    for name, value in {"TARGET": server.address, "CA_CERT": str(tmp_path / "ca.crt"),
                        "CLIENT_CERT": str(client_cert), "CLIENT_KEY": str(client_key),
                        "SERVER_NAME": SERVER_NAME, "API_KEY": ALICE_KEY, "TIMEOUT": "20",
                        "MAX_RETRIES": "0"}.items():
        monkeypatch.setenv("TOKENRELAY_" + name, value)
    return server


async def test_async_client_from_the_environment(secured):
    async with AsyncClient() as client:
        assert client.target == secured.address and client.timeout == 20.0 and client.max_retries == 0
        result = await client.generate("hello", max_tokens=3)
        assert result.usage.completion_tokens == 3  # mTLS handshake and API key both accepted
        job = (await client.submit("a job", max_tokens=2)).job
        assert (await client.wait(job.job_id, timeout=20)).ended
    async with AsyncClient(api_key="tr-wrong-key") as wrong:  # an argument wins over the variable
        with pytest.raises(UnauthenticatedError):
            await wrong.generate("hello", max_tokens=1)


async def test_blocking_client_from_the_environment(secured):
    def call() -> int:
        with Client() as client:
            return client.generate("hello", max_tokens=2).usage.completion_tokens
    assert await asyncio.wait_for(asyncio.to_thread(call), 30) == 2
