"""Signed webhooks: signatures checked by the Standard Webhooks reference library, deliveries to a
real HTTP receiver on 127.0.0.1, the retry schedule, and the SSRF refusals (DNS rebinding too)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from standardwebhooks import Webhook, WebhookVerificationError

from tokenrelay_engines.base import InvalidRequest
from tokenrelay_server.jobs.webhook_url import forbidden_reason
from tokenrelay_server.main import apply_env_defaults
from tokenrelay_server.jobs.webhooks import (
    DeliveryAttempt,
    WebhookConfig,
    WebhookSender,
    add_webhook_arguments,
    sign,
    validate_webhook_url,
    webhook_config_from_args,
)

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PUBLIC = "93.184.215.14"  # a globally routable address; tests never really connect to it
WAIT = 10.0  # bound on every wait in this file


# --- a real HTTP receiver -----------------------------------------------------------------


@dataclass
class Received:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An asyncio HTTP/1.1 server on 127.0.0.1 answering with `statuses` in turn (then 200)."""

    statuses: list[int] = field(default_factory=list)
    hang: bool = False  # accept, read, never answer (until teardown)
    garbage: bool = False  # answer with something that is not HTTP
    requests: asyncio.Queue = field(default_factory=asyncio.Queue)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None
    port: int = 0

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> Receiver:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, target, _ = (await reader.readline()).decode().split(" ", 2)
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            await self.requests.put(Received(method, target, headers, body))
            if self.hang:
                await self.release.wait()
                return
            if self.garbage:
                writer.write(b"hello there\r\n\r\n")
            else:
                status = self.statuses.pop(0) if self.statuses else 200
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".encode())
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, ValueError):
            pass
        finally:
            writer.close()

    async def next_request(self) -> Received:
        return await asyncio.wait_for(self.requests.get(), WAIT)

    async def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            self.server.close()
            try:
                await asyncio.wait_for(self.server.wait_closed(), WAIT)
            except TimeoutError:
                pass


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rx = await Receiver().start()
    yield rx
    await rx.stop()


class Recorder:
    """on_attempt, sleep, resolver and connector doubles that write down how they were called."""

    def __init__(self, answers: list[list[str]] | None = None, redirect_port: int | None = None) -> None:
        self.attempts: list[DeliveryAttempt] = []
        self.sleeps: list[float] = []
        self.answers = answers or []
        self.resolved: list[str] = []
        self.connected: list[tuple[str, int, str | None]] = []
        self.redirect_port = redirect_port

    async def on_attempt(self, attempt: DeliveryAttempt) -> None:
        self.attempts.append(attempt)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    async def resolve(self, host: str, port: int) -> list[str]:
        self.resolved.append(host)
        return self.answers[min(len(self.resolved), len(self.answers)) - 1]

    async def connect(self, address: str, port: int, *, ssl: ssl.SSLContext | None, server_hostname: str | None):
        """Records the address and, when a redirect port is set, reaches the local receiver instead."""
        self.connected.append((address, port, server_hostname))
        if self.redirect_port is None:
            raise ConnectionRefusedError("test connector: no route")
        return await asyncio.open_connection("127.0.0.1", self.redirect_port)


def loopback_config(**overrides) -> WebhookConfig:
    base = dict(secret=SECRET, allow_private_hosts=("127.0.0.1",), allow_http=True, timeout_seconds=WAIT)
    base.update(overrides)
    return WebhookConfig(**base)


async def deliver(sender: WebhookSender, rec: Recorder, url: str, message_id: str = "msg_1",
                  payload: bytes = b'{"job_id": "j1", "state": "succeeded"}') -> bool:
    async with asyncio.timeout(4 * WAIT):
        return await sender.deliver(url, message_id, payload, rec.on_attempt)


# --- signatures -----------------------------------------------------------------------------


def test_sign_matches_the_specification_vector():
    # the example from the Standard Webhooks specification's reference implementations
    assert sign(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}') == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


@settings(max_examples=60, deadline=None)
@given(
    message_id=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=40),
    timestamp=st.integers(min_value=0, max_value=2**33),
    payload=st.text(max_size=200),
    key=st.binary(min_size=16, max_size=64),
)
def test_sign_agrees_with_the_reference_library(message_id, timestamp, payload, key):
    import base64

    secret = "whsec_" + base64.b64encode(key).decode()
    when = datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)
    assert sign(secret, message_id, timestamp, payload.encode()) == Webhook(secret).sign(message_id, when, payload)


def test_bad_secrets_are_refused_without_echoing_them():
    for secret in ("whsec_not*base64!", "whsec_c2hvcnQ=", "plain words"):
        with pytest.raises(ValueError) as info:
            WebhookConfig(secret=secret)
        assert secret not in str(info.value)
    assert "whsec" not in repr(WebhookConfig(secret=SECRET))


# --- delivery to a real receiver --------------------------------------------------------------


async def test_delivery_posts_a_request_the_reference_library_verifies(receiver):
    rec = Recorder()
    sender = WebhookSender(loopback_config(), sleep=rec.sleep, clock=lambda: 1_700_000_000.5)
    payload = json.dumps({"job_id": "job-123", "state": "succeeded", "text": "héllo"}).encode()
    url = f"http://127.0.0.1:{receiver.port}/hooks/job?tenant=a&x=1"

    assert await deliver(sender, rec, url, "msg_abc", payload) is True

    got = await receiver.next_request()
    assert got.method == "POST"
    assert got.target == "/hooks/job?tenant=a&x=1"
    assert got.headers["host"] == f"127.0.0.1:{receiver.port}"
    assert got.headers["content-type"] == "application/json"
    assert got.headers["webhook-id"] == "msg_abc"
    assert got.headers["webhook-timestamp"] == "1700000000"
    assert got.body == payload
    assert rec.attempts == [DeliveryAttempt(1, 1_700_000_000.5, 200, "")]
    assert rec.sleeps == []


async def test_signature_header_verifies_and_tampering_does_not(receiver):
    rec = Recorder()
    sender = WebhookSender(loopback_config(), sleep=rec.sleep)  # real clock: the library checks freshness
    payload = b'{"job_id": "job-9", "state": "failed", "error": "boom"}'
    assert await deliver(sender, rec, f"http://127.0.0.1:{receiver.port}/", "msg_9", payload)

    got = await receiver.next_request()
    assert Webhook(SECRET).verify(got.body, got.headers) == json.loads(payload)
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(got.body.replace(b"failed", b"succeeded"), got.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + "QUJD" * 8).verify(got.body, got.headers)


async def test_retries_follow_the_backoff_schedule(receiver):
    receiver.statuses[:] = [500, 500, 200]
    rec = Recorder()
    sender = WebhookSender(loopback_config(backoff_seconds=(0.5, 2.0, 7.0)), sleep=rec.sleep)
    assert await deliver(sender, rec, f"http://127.0.0.1:{receiver.port}/cb") is True

    assert [a.attempt for a in rec.attempts] == [1, 2, 3]
    assert [a.http_status for a in rec.attempts] == [500, 500, 200]
    assert [a.error for a in rec.attempts] == ["HTTP 500 response", "HTTP 500 response", ""]
    assert rec.sleeps == [0.5, 2.0]
    ids = set()
    for _ in range(3):
        got = await receiver.next_request()
        Webhook(SECRET).verify(got.body, got.headers)
        ids.add(got.headers["webhook-id"])
    assert ids == {"msg_1"}  # the same message id on every retry: receivers deduplicate on it


async def test_gives_up_after_max_attempts_and_the_last_delay_repeats(receiver):
    receiver.statuses[:] = [503] * 10
    rec = Recorder()
    sender = WebhookSender(loopback_config(max_attempts=4, backoff_seconds=(1.0, 3.0)), sleep=rec.sleep)
    assert await deliver(sender, rec, f"http://127.0.0.1:{receiver.port}/cb") is False
    assert [a.http_status for a in rec.attempts] == [503] * 4
    assert rec.sleeps == [1.0, 3.0, 3.0]
    assert receiver.requests.qsize() == 4


async def test_connection_failure_is_retried_with_status_zero():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rec = Recorder()
    sender = WebhookSender(loopback_config(max_attempts=3, backoff_seconds=(2.0,)), sleep=rec.sleep)
    assert await deliver(sender, rec, f"http://127.0.0.1:{port}/cb") is False
    assert [a.http_status for a in rec.attempts] == [0, 0, 0]
    assert all(a.error.startswith("connection failed") for a in rec.attempts)
    assert rec.sleeps == [2.0, 2.0]


async def test_a_receiver_that_never_answers_times_out_and_is_retried(receiver):
    receiver.hang = True
    rec = Recorder()
    sender = WebhookSender(loopback_config(max_attempts=2, timeout_seconds=0.2), sleep=rec.sleep)
    assert await deliver(sender, rec, f"http://127.0.0.1:{receiver.port}/cb") is False
    assert [(a.http_status, a.error) for a in rec.attempts] == [(0, "timed out after 0.2s")] * 2
    assert rec.sleeps == [1.0]


async def test_a_receiver_that_does_not_speak_http_is_a_failed_attempt(receiver):
    receiver.garbage = True
    rec = Recorder()
    sender = WebhookSender(loopback_config(max_attempts=1), sleep=rec.sleep)
    assert await deliver(sender, rec, f"http://127.0.0.1:{receiver.port}/cb") is False
    assert rec.attempts[0].http_status == 0 and rec.attempts[0].error.startswith("bad response")


# --- SSRF -----------------------------------------------------------------------------------

REFUSED_URLS = [
    "https://127.0.0.1/cb",
    "https://localhost/cb",
    "https://app.localhost:8443/cb",
    "https://10.1.2.3/cb",
    "https://172.16.0.5/cb",
    "https://192.168.1.10/cb",
    "https://169.254.169.254/latest/meta-data/",
    "https://[::1]/cb",
    "https://[::ffff:127.0.0.1]/cb",
    "https://[::ffff:a9fe:a9fe]/cb",
    "https://[fd00:ec2::254]/cb",
    "https://[fe80::1]/cb",
    "https://[2002:7f00:1::]/cb",  # 6to4 wrapping 127.0.0.1
    "https://100.64.3.4/cb",
    "https://0.0.0.0/cb",
    "https://[::]/cb",
    "https://224.0.0.1/cb",
    "https://255.255.255.255/cb",
    "https://2130706433/cb",  # 127.0.0.1 as one number
    "https://0x7f.0.0.1/cb",
    "https://127.1/cb",
]


@pytest.mark.parametrize("url", REFUSED_URLS)
async def test_internal_targets_are_refused_at_submit_and_at_delivery(url):
    config = WebhookConfig(secret=SECRET)
    with pytest.raises(InvalidRequest) as info:
        validate_webhook_url(url, config)
    assert info.value.field == "webhook.url"

    rec = Recorder(answers=[["127.0.0.1"]])
    sender = WebhookSender(config, resolver=rec.resolve, sleep=rec.sleep, connect=rec.connect)
    assert await deliver(sender, rec, url) is False
    assert len(rec.attempts) == 1  # permanent: not retried
    assert rec.attempts[0].http_status == 0 and rec.attempts[0].error.startswith("refused:")
    assert rec.sleeps == [] and rec.connected == []


@pytest.mark.parametrize("answers", [["10.0.0.7"], [PUBLIC, "127.0.0.1"], ["169.254.169.254"],
                                     ["::ffff:192.168.0.1"], ["100.100.100.100"]])
async def test_a_host_resolving_to_an_internal_address_is_refused(answers):
    config = WebhookConfig(secret=SECRET)
    url = "https://hooks.example.com/cb"
    validate_webhook_url(url, config)  # nothing wrong without DNS

    rec = Recorder(answers=[answers])
    sender = WebhookSender(config, resolver=rec.resolve, sleep=rec.sleep, connect=rec.connect)
    assert await deliver(sender, rec, url) is False
    assert rec.resolved == ["hooks.example.com"]
    assert len(rec.attempts) == 1 and "is not allow-listed" in rec.attempts[0].error
    assert rec.connected == [] and rec.sleeps == []


async def test_dns_rebinding_connects_only_to_the_checked_address(receiver):
    # the first answer is public, any later one is loopback: the connection must use the first
    rec = Recorder(answers=[[PUBLIC], ["127.0.0.1"]], redirect_port=receiver.port)
    sender = WebhookSender(WebhookConfig(secret=SECRET, allow_http=True), resolver=rec.resolve,
                           sleep=rec.sleep, connect=rec.connect)
    assert await deliver(sender, rec, "http://hooks.example.com:8080/cb") is True

    assert rec.resolved == ["hooks.example.com"]  # resolved once, never again for the connection
    assert rec.connected == [(PUBLIC, 8080, None)]
    got = await receiver.next_request()
    assert got.headers["host"] == "hooks.example.com:8080"


async def test_a_retry_checks_the_new_answer_again(receiver):
    receiver.statuses[:] = [502]
    rec = Recorder(answers=[[PUBLIC], ["127.0.0.1"]], redirect_port=receiver.port)
    sender = WebhookSender(WebhookConfig(secret=SECRET, allow_http=True), resolver=rec.resolve,
                           sleep=rec.sleep, connect=rec.connect)
    assert await deliver(sender, rec, "http://hooks.example.com:8080/cb") is False
    assert [a.http_status for a in rec.attempts] == [502, 0]
    assert rec.attempts[1].error.startswith("refused:") and "127.0.0.1 is loopback" in rec.attempts[1].error
    assert rec.connected == [(PUBLIC, 8080, None)]


async def test_the_allow_list_lets_loopback_through(receiver):
    url = f"http://localhost:{receiver.port}/cb"
    closed = WebhookConfig(secret=SECRET, allow_http=True)
    with pytest.raises(InvalidRequest):
        validate_webhook_url(url, closed)
    rec = Recorder()
    assert await deliver(WebhookSender(closed, sleep=rec.sleep), rec, url) is False
    assert receiver.requests.empty()

    opened = WebhookConfig(secret=SECRET, allow_http=True, allow_private_hosts=("localhost",))
    validate_webhook_url(url, opened)
    rec = Recorder()  # the system resolver; ::1 (if any) is tried and refused, then 127.0.0.1
    assert await deliver(WebhookSender(opened, sleep=rec.sleep), rec, url) is True
    got = await receiver.next_request()
    assert got.headers["host"] == f"localhost:{receiver.port}"


def test_allow_list_entries_by_network_and_wildcard():
    config = WebhookConfig(secret=SECRET, allow_private_hosts=("10.0.0.0/8", "*.corp.internal", "fd00::/8"))
    validate_webhook_url("https://10.20.30.40/cb", config)
    validate_webhook_url("https://[fd00::5]/cb", config)
    validate_webhook_url("https://hooks.corp.internal/cb", config)
    with pytest.raises(InvalidRequest):
        validate_webhook_url("https://192.168.0.1/cb", config)
    with pytest.raises(InvalidRequest):  # never a target, whatever the list says
        validate_webhook_url("https://0.0.0.0/cb", WebhookConfig(secret=SECRET, allow_private_hosts=("0.0.0.0/0",)))
    with pytest.raises(ValueError):
        WebhookConfig(secret=SECRET, allow_private_hosts=("not a host!",))


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_ipv4_mapped_addresses_are_judged_like_the_address_they_carry(value):
    v4 = ipaddress.IPv4Address(value)
    mapped = ipaddress.IPv6Address(f"::ffff:{v4}")
    assert (forbidden_reason(v4) is None) == (forbidden_reason(mapped) is None)


# --- bad URLs and configuration -------------------------------------------------------------


@pytest.mark.parametrize("url, fragment", [
    ("ftp://hooks.example.com/cb", "scheme"),
    ("https:///cb", "host"),
    ("https://user:pass@hooks.example.com/cb", "credentials"),
    ("https://@hooks.example.com/cb", "credentials"),
    ("hooks.example.com/cb", "scheme"),
    ("", "non-empty"),
    ("https://hooks.exa mple.com/", "whitespace"),
    ("https://hooks.example.com/\r\nX-Injected: 1", "whitespace"),
    ("https://hooks.example.com:99999/", "port"),
    ("https://hooks_$.example.com/", "host"),
    ("https://[not-v6]/", "URL"),
    ("http://hooks.example.com/cb", "https"),
    ("https://hooks.example.com/" + "a" * 3000, "characters"),
])
def test_bad_urls_are_rejected_with_a_clear_message(url, fragment):
    with pytest.raises(InvalidRequest) as info:
        validate_webhook_url(url, WebhookConfig(secret=SECRET))
    assert info.value.field == "webhook.url"
    assert fragment in info.value.description


def test_urls_are_rejected_while_webhooks_are_disabled():
    with pytest.raises(InvalidRequest, match="not enabled"):
        validate_webhook_url("https://hooks.example.com/cb", WebhookConfig())


def make_tls_pair(hostname: str, directory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A self-signed certificate for `hostname`: (server context, client context trusting only it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (directory / "cert.pem").write_bytes(cert_pem)
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    client_ctx = ssl.create_default_context(cadata=cert_pem.decode())
    return server_ctx, client_ctx


async def test_tls_uses_the_original_host_for_sni_and_the_certificate_check(tmp_path):
    pytest.importorskip("cryptography")
    server_ctx, client_ctx = make_tls_pair("hooks.example.test", tmp_path)
    rx = await Receiver().start(server_ctx)
    try:
        async def resolve(host: str, port: int) -> list[str]:
            return ["127.0.0.1"]

        config = WebhookConfig(secret=SECRET, allow_private_hosts=("hooks.example.test", "hooks.other.test"),
                               max_attempts=1)
        rec = Recorder()
        sender = WebhookSender(config, resolver=resolve, sleep=rec.sleep, ssl_context=client_ctx)
        assert await deliver(sender, rec, f"https://hooks.example.test:{rx.port}/cb") is True
        got = await rx.next_request()
        Webhook(SECRET).verify(got.body, got.headers)
        assert got.headers["host"] == f"hooks.example.test:{rx.port}"

        # same address, another name: the certificate does not match it, so nothing is sent
        rec = Recorder()
        sender = WebhookSender(config, resolver=resolve, sleep=rec.sleep, ssl_context=client_ctx)
        assert await deliver(sender, rec, f"https://hooks.other.test:{rx.port}/cb") is False
        assert rec.attempts[0].http_status == 0 and rec.attempts[0].error.startswith("TLS error")
        assert rx.requests.empty()
    finally:
        await rx.stop()


def test_cli_flags_build_the_config(monkeypatch):
    monkeypatch.setenv("TOKENRELAY_WEBHOOK_SECRET", SECRET)
    parser = argparse.ArgumentParser()
    add_webhook_arguments(parser)
    apply_env_defaults(parser)  # the one rule every serve flag follows (server.main)
    args = parser.parse_args(["--webhook-allow-host", "127.0.0.1", "--webhook-allow-host", "10.0.0.0/8",
                              "--webhook-max-attempts", "3", "--webhook-backoff", "1,2.5",
                              "--webhook-timeout", "4", "--webhook-allow-http"])
    assert webhook_config_from_args(args) == WebhookConfig(
        secret=SECRET, allow_private_hosts=("127.0.0.1", "10.0.0.0/8"), max_attempts=3,
        backoff_seconds=(1.0, 2.5), timeout_seconds=4.0, allow_http=True)

    monkeypatch.delenv("TOKENRELAY_WEBHOOK_SECRET")
    parser = argparse.ArgumentParser()
    add_webhook_arguments(parser)
    defaults = webhook_config_from_args(parser.parse_args([]))
    assert defaults == WebhookConfig() and not defaults.enabled


@pytest.mark.parametrize("argv", [["--webhook-secret", "whsec_%%%"], ["--webhook-max-attempts", "0"],
                                  ["--webhook-backoff", "1,x"], ["--webhook-allow-host", "bad host!"],
                                  ["--webhook-timeout", "-1"]])
def test_bad_cli_flags_exit_with_a_usage_error(argv, capsys):
    parser = argparse.ArgumentParser()
    add_webhook_arguments(parser)
    with pytest.raises(SystemExit) as info:
        parser.parse_args(argv)
    assert info.value.code == 2
    assert "%%%" not in capsys.readouterr().err  # a secret is never echoed


async def test_delivery_while_disabled_is_one_refused_attempt():
    rec = Recorder(answers=[[PUBLIC]])
    sender = WebhookSender(WebhookConfig(), resolver=rec.resolve, sleep=rec.sleep, connect=rec.connect)
    assert await deliver(sender, rec, "https://hooks.example.com/cb") is False
    assert len(rec.attempts) == 1 and "not enabled" in rec.attempts[0].error
    assert rec.resolved == [] and rec.connected == []


@pytest.mark.parametrize("message_id", ["", "msg 1", "msg\r\nX: y", "msg_é"])
async def test_a_bad_message_id_is_a_clear_error_before_any_attempt(message_id):
    rec = Recorder(answers=[[PUBLIC]])
    sender = WebhookSender(WebhookConfig(secret=SECRET), resolver=rec.resolve, sleep=rec.sleep, connect=rec.connect)
    with pytest.raises(ValueError, match="message_id"):
        await deliver(sender, rec, "https://hooks.example.com/cb", message_id)
    assert rec.attempts == [] and rec.connected == []


async def test_every_resolved_address_is_tried_in_order(receiver):
    # the first checked address refuses the connection; the second one is reached
    rec = Recorder(answers=[[PUBLIC, "2606:4700::1111"]], redirect_port=receiver.port)
    original = rec.connect

    async def first_refuses(address, port, *, ssl, server_hostname):
        if address == PUBLIC:
            rec.connected.append((address, port, server_hostname))
            raise ConnectionRefusedError("refused")
        return await original(address, port, ssl=ssl, server_hostname=server_hostname)

    sender = WebhookSender(WebhookConfig(secret=SECRET, allow_http=True), resolver=rec.resolve,
                           sleep=rec.sleep, connect=first_refuses)
    assert await deliver(sender, rec, "http://hooks.example.com/cb") is True
    assert [c[0] for c in rec.connected] == [PUBLIC, "2606:4700::1111"]
    assert (await receiver.next_request()).headers["host"] == "hooks.example.com"
