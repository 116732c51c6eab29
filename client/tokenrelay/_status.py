"""Decode the `grpc-status-details-bin` trailer (a google.rpc.Status) without googleapis protos.

The client installs with grpcio and protobuf only, so the few google.rpc messages it reads
(Status, BadRequest, RetryInfo, ErrorInfo) are built here from hand-written descriptors in a
PRIVATE descriptor pool. Nothing is registered in protobuf's default pool, so this never clashes
with googleapis-common-protos when both are installed.

The decoded details are plain frozen values (FieldViolation, RetryInfo, ErrorInfo,
UnknownDetail), so callers never see a message class from the private pool.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, duration_pb2, message_factory
from google.protobuf.message import DecodeError

STATUS_DETAILS_KEY = "grpc-status-details-bin"
_TYPE_PREFIX = "type.googleapis.com/"

_F = descriptor_pb2.FieldDescriptorProto


class FieldViolation(NamedTuple):
    """One bad field of a request (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


@dataclass(slots=True, frozen=True)
class BadRequest:
    field_violations: tuple[FieldViolation, ...]


@dataclass(slots=True, frozen=True)
class RetryInfo:
    retry_delay: float  # seconds the server asks the client to wait before retrying


@dataclass(slots=True, frozen=True)
class ErrorInfo:
    reason: str
    domain: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class UnknownDetail:
    """A detail this client does not decode, kept as its Any payload."""

    type_url: str
    value: bytes


Detail = BadRequest | RetryInfo | ErrorInfo | UnknownDetail


@dataclass(slots=True, frozen=True)
class StatusDetails:
    code: int  # google.rpc.Code, as sent in the Status message
    message: str
    details: tuple[Detail, ...] = ()


def _field(name: str, number: int, ftype: Any, *, label: Any = _F.LABEL_OPTIONAL,
           type_name: str = "") -> descriptor_pb2.FieldDescriptorProto:
    proto = _F(name=name, number=number, type=ftype, label=label)
    if type_name:
        proto.type_name = type_name
    return proto


def _rpc_files() -> list[descriptor_pb2.FileDescriptorProto]:
    status = descriptor_pb2.FileDescriptorProto(
        name="google/rpc/status.proto", package="google.rpc", syntax="proto3",
        dependency=["google/protobuf/any.proto"])
    status.message_type.add(name="Status", field=[
        _field("code", 1, _F.TYPE_INT32),
        _field("message", 2, _F.TYPE_STRING),
        _field("details", 3, _F.TYPE_MESSAGE, label=_F.LABEL_REPEATED,
               type_name=".google.protobuf.Any"),
    ])
    details = descriptor_pb2.FileDescriptorProto(
        name="google/rpc/error_details.proto", package="google.rpc", syntax="proto3",
        dependency=["google/protobuf/duration.proto"])
    details.message_type.add(name="RetryInfo", field=[
        _field("retry_delay", 1, _F.TYPE_MESSAGE, type_name=".google.protobuf.Duration"),
    ])
    error_info = details.message_type.add(name="ErrorInfo", field=[
        _field("reason", 1, _F.TYPE_STRING),
        _field("domain", 2, _F.TYPE_STRING),
        _field("metadata", 3, _F.TYPE_MESSAGE, label=_F.LABEL_REPEATED,
               type_name=".google.rpc.ErrorInfo.MetadataEntry"),
    ])
    entry = error_info.nested_type.add(name="MetadataEntry", field=[
        _field("key", 1, _F.TYPE_STRING), _field("value", 2, _F.TYPE_STRING)])
    entry.options.map_entry = True
    bad_request = details.message_type.add(name="BadRequest", field=[
        _field("field_violations", 1, _F.TYPE_MESSAGE, label=_F.LABEL_REPEATED,
               type_name=".google.rpc.BadRequest.FieldViolation"),
    ])
    bad_request.nested_type.add(name="FieldViolation", field=[
        _field("field", 1, _F.TYPE_STRING), _field("description", 2, _F.TYPE_STRING)])
    return [status, details]


class _Messages(NamedTuple):
    status: Any
    bad_request: Any
    retry_info: Any
    error_info: Any


@functools.lru_cache(maxsize=1)
def _messages() -> _Messages:
    """Message classes from a private pool, built once (immutable afterwards)."""
    pool = descriptor_pool.DescriptorPool()
    for module in (any_pb2, duration_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        pool.Add(proto)
    for proto in _rpc_files():
        pool.Add(proto)

    def cls(name: str) -> Any:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))

    return _Messages(cls("google.rpc.Status"), cls("google.rpc.BadRequest"),
                     cls("google.rpc.RetryInfo"), cls("google.rpc.ErrorInfo"))


def _decode_any(type_url: str, value: bytes, messages: _Messages) -> Detail:
    name = type_url.rsplit("/", 1)[-1]
    try:
        if name == "google.rpc.BadRequest":
            msg = messages.bad_request.FromString(value)
            return BadRequest(tuple(FieldViolation(v.field, v.description)
                                    for v in msg.field_violations))
        if name == "google.rpc.RetryInfo":
            msg = messages.retry_info.FromString(value)
            return RetryInfo(msg.retry_delay.seconds + msg.retry_delay.nanos / 1e9)
        if name == "google.rpc.ErrorInfo":
            msg = messages.error_info.FromString(value)
            return ErrorInfo(msg.reason, msg.domain, dict(msg.metadata))
    except DecodeError:
        pass
    return UnknownDetail(type_url, bytes(value))


def decode_status(data: bytes) -> StatusDetails | None:
    """Decode a serialized google.rpc.Status; None when the bytes are not one."""
    messages = _messages()
    try:
        status = messages.status.FromString(data)
    except DecodeError:
        return None
    details = tuple(_decode_any(d.type_url, d.value, messages) for d in status.details)
    return StatusDetails(status.code, status.message, details)


def details_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> StatusDetails | None:
    """Find and decode the status details trailer in gRPC trailing metadata."""
    for key, value in metadata or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return decode_status(value)
    return None


def encode_status(code: int, message: str, details: Iterable[Detail] = ()) -> bytes:
    """Serialize a google.rpc.Status (the inverse of decode_status; used by tests and fakes)."""
    messages = _messages()
    status = messages.status(code=code, message=message)
    for detail in details:
        if isinstance(detail, BadRequest):
            msg = messages.bad_request()
            for violation in detail.field_violations:
                msg.field_violations.add(field=violation.field, description=violation.description)
            name = "google.rpc.BadRequest"
        elif isinstance(detail, RetryInfo):
            msg = messages.retry_info()
            seconds = int(detail.retry_delay)
            msg.retry_delay.seconds = seconds
            msg.retry_delay.nanos = round((detail.retry_delay - seconds) * 1e9)
            name = "google.rpc.RetryInfo"
        elif isinstance(detail, ErrorInfo):
            msg = messages.error_info(reason=detail.reason, domain=detail.domain)
            msg.metadata.update(detail.metadata)
            name = "google.rpc.ErrorInfo"
        else:
            status.details.add(type_url=detail.type_url, value=detail.value)
            continue
        status.details.add(type_url=_TYPE_PREFIX + name, value=msg.SerializeToString())
    data: bytes = status.SerializeToString()
    return data
