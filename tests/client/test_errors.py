"""Client-side error decoding, typed exceptions, retry policy and option mapping (no server)."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2

from tokenrelay import _params
from tokenrelay._retry import Deadline, RetryPolicy
from tokenrelay._status import (
    BadRequest,
    ErrorInfo,
    FieldViolation,
    RetryInfo,
    UnknownDetail,
    decode_status,
    details_from_metadata,
    encode_status,
)
from tokenrelay.errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    TokenRelayError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    from_rpc_error,
)
from tokenrelay.v1 import jobs_pb2


class FakeRpcError(grpc.RpcError):
    """What grpc raises: code(), details(), trailing_metadata()."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers=()) -> None:
        self._code, self._details, self._trailers = code, details, tuple(trailers)

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._trailers


def test_googleapis_status_decodes_with_private_pool():
    # Encoded by the real googleapis-common-protos classes (a test-only dependency).
    from google.rpc import code_pb2, error_details_pb2, status_pb2

    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="bad request")
    bad = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="sampling.top_p", description="must be in (0, 1]"),
        error_details_pb2.BadRequest.FieldViolation(field="stopping.max_tokens", description="must be >= 1"),
    ])
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=250_000_000))
    info = error_details_pb2.ErrorInfo(reason="QUEUE_FULL", domain="tokenrelay", metadata={"queue": "interactive"})
    for message in (bad, retry, info):
        packed = any_pb2.Any()
        packed.Pack(message)
        status.details.append(packed)
    status.details.add(type_url="type.googleapis.com/acme.Unknown", value=b"\x08\x01")

    decoded = decode_status(status.SerializeToString())
    assert decoded.code == code_pb2.INVALID_ARGUMENT and decoded.message == "bad request"
    assert decoded.details == (
        BadRequest((FieldViolation("sampling.top_p", "must be in (0, 1]"),
                    FieldViolation("stopping.max_tokens", "must be >= 1"))),
        RetryInfo(1.25),
        ErrorInfo("QUEUE_FULL", "tokenrelay", {"queue": "interactive"}),
        UnknownDetail("type.googleapis.com/acme.Unknown", b"\x08\x01"),
    )
    # And our encoder produces what googleapis parses.
    again = status_pb2.Status.FromString(encode_status(3, "bad request", decoded.details))
    assert again == status


def test_private_pool_never_touches_default_pool():
    # In a fresh interpreter: decoding first must leave google.rpc unregistered, and importing
    # googleapis-common-protos afterwards must still work (no duplicate-symbol clash).
    code = textwrap.dedent("""
        from google.protobuf import descriptor_pool
        from tokenrelay._status import decode_status, encode_status, RetryInfo
        assert decode_status(encode_status(8, "full", [RetryInfo(0.5)])).details == (RetryInfo(0.5),)
        try:
            descriptor_pool.Default().FindMessageTypeByName("google.rpc.Status")
        except KeyError:
            pass
        else:
            raise SystemExit("google.rpc.Status leaked into the default pool")
        from google.rpc import error_details_pb2, status_pb2
        assert status_pb2.Status.FromString(encode_status(8, "full")).message == "full"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_garbage_details_are_ignored():
    assert decode_status(b"\xff\xff\xff") is None
    error = from_rpc_error(FakeRpcError(grpc.StatusCode.INTERNAL, "boom",
                                        [("grpc-status-details-bin", b"\xff\xff\xff")]))
    assert isinstance(error, InternalError) and error.details == ()
    assert details_from_metadata(None) is None


@pytest.mark.parametrize(("code", "cls"), [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgumentError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhaustedError),
    (grpc.StatusCode.UNAVAILABLE, UnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceededError),
    (grpc.StatusCode.NOT_FOUND, NotFoundError),
    (grpc.StatusCode.ALREADY_EXISTS, AlreadyExistsError),
    (grpc.StatusCode.FAILED_PRECONDITION, FailedPreconditionError),
    (grpc.StatusCode.CANCELLED, CancelledError),
    (grpc.StatusCode.UNAUTHENTICATED, UnauthenticatedError),
    (grpc.StatusCode.UNIMPLEMENTED, UnimplementedError),
    (grpc.StatusCode.INTERNAL, InternalError),
    (grpc.StatusCode.UNKNOWN, InternalError),
])
def test_status_codes_map_to_typed_errors(code, cls):
    error = from_rpc_error(FakeRpcError(code, "msg"))
    assert type(error) is cls and isinstance(error, TokenRelayError)
    assert error.code == code and error.message == "msg"
    assert str(error) == f"{code.name}: msg"
    assert error.field_violations == [] and error.retry_delay is None


def test_error_carries_field_violations_retry_delay_and_request_id():
    trailers = [
        ("x-request-id", "req-42"),
        ("grpc-status-details-bin", encode_status(3, "bad", [
            BadRequest((FieldViolation("sampling.temperature", "must be >= 0"),)),
            RetryInfo(0.2), ErrorInfo("INVALID", "tokenrelay")])),
    ]
    error = from_rpc_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad", trailers))
    assert isinstance(error, InvalidArgumentError)
    assert error.field_violations == [("sampling.temperature", "must be >= 0")]
    field, description = error.field_violations[0]
    assert field == "sampling.temperature" and description == "must be >= 0"
    assert error.retry_delay == pytest.approx(0.2)
    assert error.error_info.reason == "INVALID"
    assert error.request_id == "req-42"
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is InvalidArgumentError and clone.field_violations == error.field_violations


def test_retry_policy_retries_unavailable_and_hinted_resource_exhausted_within_budget():
    policy = RetryPolicy(max_retries=2, initial_backoff=0.1, max_backoff=1.0)
    assert RetryPolicy().max_retries == 2  # the default budget
    unavailable = UnavailableError(grpc.StatusCode.UNAVAILABLE, "down")
    no_deadline = Deadline(None)
    assert 0.05 <= policy.next_delay(unavailable, 0, no_deadline) <= 0.1
    assert 0.1 <= policy.next_delay(unavailable, 1, no_deadline) <= 0.2
    assert policy.next_delay(unavailable, 2, no_deadline) is None  # budget spent
    # A full queue says when to come back: retried after at least that delay (jittered up).
    full = ResourceExhaustedError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", [RetryInfo(0.5)])
    delays = [policy.next_delay(full, 0, no_deadline) for _ in range(50)]
    assert all(0.5 <= d <= 0.625 for d in delays) and len(set(delays)) > 1
    assert policy.next_delay(full, 2, no_deadline) is None
    # RESOURCE_EXHAUSTED without a hint (e.g. a message over grpc's size limit) is final.
    for cls, code in ((ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
                      (DeadlineExceededError, grpc.StatusCode.DEADLINE_EXCEEDED),
                      (InternalError, grpc.StatusCode.INTERNAL),
                      (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT)):
        assert policy.next_delay(cls(code, "x"), 0, no_deadline) is None
    # A wait that would end after the deadline is not taken; nor is an absurd hint.
    assert policy.next_delay(unavailable, 0, Deadline(0.01)) is None
    assert policy.next_delay(full, 0, Deadline(0.3)) is None
    huge = ResourceExhaustedError(grpc.StatusCode.RESOURCE_EXHAUSTED, "x", [RetryInfo(3600.0)])
    assert policy.next_delay(huge, 0, no_deadline) is None
    hinted = UnavailableError(grpc.StatusCode.UNAVAILABLE, "draining", [RetryInfo(0.5)])
    assert 0.5 <= policy.next_delay(hinted, 0, no_deadline) <= 0.625
    for attempt in range(10):
        assert policy.backoff(attempt) <= 1.0
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError):
        Deadline(-1.0)


def test_generation_options_map_to_params():
    p = _params.generation_params([5, 6, 7], {
        "temperature": 0.0, "top_p": 0.9, "top_k": 4, "min_p": 0.1, "repetition_penalty": 1.1,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "seed": 2**63, "max_tokens": 9,
        "min_tokens": 2, "stop": "END", "stop_token_ids": [3], "ignore_eos": True,
        "include_stop_in_output": True, "logprobs": 2, "priority": -3, "request_id": "r"})
    assert list(p.token_ids.ids) == [5, 6, 7] and p.WhichOneof("prompt") == "token_ids"
    assert p.sampling.HasField("temperature") and p.sampling.temperature == 0.0
    assert p.sampling.top_k == 4 and p.sampling.seed == 2**63
    assert p.stopping.max_tokens == 9 and list(p.stopping.stop) == ["END"]
    assert list(p.stopping.stop_token_ids) == [3] and p.stopping.ignore_eos
    assert p.logprobs == 2 and p.priority == -3 and p.request_id == "r"
    bare = _params.generation_params("hi", {"temperature": None})
    assert bare.text == "hi" and not bare.sampling.HasField("temperature")
    assert not bare.HasField("logprobs") and not bare.stopping.HasField("max_tokens")
    with pytest.raises(TypeError, match="temprature"):
        _params.generation_params("hi", {"temprature": 0.5})
    with pytest.raises(TypeError):
        _params.generation_params(3.5, {})


def test_job_request_mapping():
    request = _params.submit_request(
        "hi", idempotency_key="k", job_priority_value="bulk", queue_ttl=1.5, result_retention=60,
        max_attempts=2, webhook_url="https://example.invalid/hook", labels={"team": "a"},
        options={"max_tokens": 4})
    assert request.priority == jobs_pb2.JOB_PRIORITY_BULK and request.idempotency_key == "k"
    assert request.queue_ttl.ToNanoseconds() == 1_500_000_000 and request.result_retention.seconds == 60
    assert request.max_attempts == 2 and request.webhook.url.endswith("/hook")
    assert dict(request.labels) == {"team": "a"} and request.params.stopping.max_tokens == 4
    assert _params.job_states(["succeeded", "JOB_STATE_RUNNING", 1]) == [
        jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_RUNNING, jobs_pb2.JOB_STATE_QUEUED]
    with pytest.raises(ValueError, match="unknown job state"):
        _params.job_states(["finished"])
    with pytest.raises(ValueError, match="job priority"):
        _params.job_priority("asap")
    with pytest.raises(ValueError):
        _params.submit_request("hi", idempotency_key="k", queue_ttl=-1, options={})


def test_client_package_needs_only_grpcio_and_protobuf():
    # The client distribution installs with grpcio + protobuf only: importing all of it (and
    # decoding status details) must not touch googleapis protos, grpc_status, numpy or the server.
    code = textwrap.dedent("""
        import importlib.abc, sys
        BLOCKED = ("google.rpc", "google.api", "grpc_status", "grpc_health", "grpc_reflection",
                   "numpy", "torch", "server", "engines", "tokenrelay_server", "tokenrelay_engines")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.startswith(BLOCKED):
                    raise ImportError(f"client imported {name}")
        sys.meta_path.insert(0, Block())
        import tokenrelay, tokenrelay.client, tokenrelay.loadgen, tokenrelay.errors, tokenrelay.types
        from tokenrelay._status import decode_status, encode_status, BadRequest, FieldViolation
        details = decode_status(encode_status(3, "x", [BadRequest((FieldViolation("f", "d"),))])).details
        assert details[0].field_violations == (("f", "d"),)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
