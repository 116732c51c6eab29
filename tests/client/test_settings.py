"""Client defaults: arguments, then TOKENRELAY_* variables, then built-in defaults."""

from __future__ import annotations

import asyncio

import pytest

from tests.client.conftest import CALL_BOUND
from tokenrelay import AsyncClient, Client, DeadlineExceededError
from tokenrelay._retry import UNSET
from tokenrelay._settings import DEFAULT_TARGET, DEFAULT_TIMEOUT, ClientSettings
from tokenrelay.v1 import text_generation_pb2_grpc

NO_ARGS = dict(target=None, timeout=UNSET, max_retries=None, tls=None, ca_cert=None, client_cert=None,
               client_key=None, server_name=None, api_key=None)


def resolve(env: dict[str, str], **args: object) -> ClientSettings:
    return ClientSettings.resolve(**{**NO_ARGS, **args}, env=env)  # type: ignore[arg-type]


def test_defaults_without_arguments_or_environment():
    settings = resolve({})
    assert settings.target == DEFAULT_TARGET == "localhost:50051"
    assert settings.timeout == DEFAULT_TIMEOUT == 600.0
    assert settings.retry.max_retries == 2
    assert not settings.security.uses_tls and settings.security.metadata() == ()


def test_environment_fills_what_the_arguments_leave_out():
    env = {"TOKENRELAY_TARGET": "relay.internal:443", "TOKENRELAY_TIMEOUT": "12.5",
           "TOKENRELAY_MAX_RETRIES": "5", "TOKENRELAY_API_KEY": "k-env", "TOKENRELAY_TLS": "true",
           "TOKENRELAY_SERVER_NAME": "relay.test"}
    settings = resolve(env)
    assert settings.target == "relay.internal:443" and settings.timeout == 12.5
    assert settings.retry.max_retries == 5 and settings.security.uses_tls
    assert settings.security.metadata() == (("authorization", "Bearer k-env"),)
    assert settings.security.options() == [("grpc.ssl_target_name_override", "relay.test")]
    explicit = resolve(env, target="other:1", timeout=None, max_retries=0, api_key="k-arg", tls=False,
                       server_name="x.test")
    assert explicit.target == "other:1" and explicit.timeout is None and explicit.retry.max_retries == 0
    assert explicit.security.metadata() == (("authorization", "Bearer k-arg"),)
    assert resolve({"TOKENRELAY_TIMEOUT": "none"}).timeout is None
    assert resolve({"TOKENRELAY_CA_CERT": "/x/ca.crt"}).security.uses_tls  # a CA file implies TLS
    assert resolve({"TOKENRELAY_TLS": "0", "TOKENRELAY_TARGET": "  "}).target == DEFAULT_TARGET


@pytest.mark.parametrize("name, value", [("TIMEOUT", "soon"), ("TIMEOUT", "-1"), ("MAX_RETRIES", "many"),
                                         ("MAX_RETRIES", "-2"), ("TLS", "maybe")])
def test_bad_environment_values_are_refused_by_name(name, value):
    with pytest.raises(ValueError, match="TOKENRELAY_" + name):
        resolve({"TOKENRELAY_" + name: value})


def test_client_certificate_needs_its_key():
    with pytest.raises(ValueError, match="client_cert and client_key"):
        resolve({"TOKENRELAY_CLIENT_CERT": "/x/c.crt"})


class Silent(text_generation_pb2_grpc.TextGenerationServiceServicer):
    """Never answers Generate (until cancelled)."""

    async def Generate(self, request, context):
        await asyncio.Event().wait()


async def test_the_default_timeout_bounds_every_call(tiny_server, monkeypatch):
    address = await tiny_server(Silent())
    monkeypatch.setenv("TOKENRELAY_TARGET", address)
    monkeypatch.setenv("TOKENRELAY_TIMEOUT", "0.3")
    async with AsyncClient() as client:
        assert client.timeout == 0.3
        with pytest.raises(DeadlineExceededError):
            await asyncio.wait_for(client.generate("x"), CALL_BOUND)
    monkeypatch.delenv("TOKENRELAY_TIMEOUT")
    with Client() as sync_client:
        assert sync_client.timeout == DEFAULT_TIMEOUT and sync_client.target == address
