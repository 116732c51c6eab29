"""Typed exceptions for failed tokenrelay calls, carrying the server's google.rpc details.

Every gRPC failure the client sees is raised as a `TokenRelayError` subclass chosen by status
code. The decoded `grpc-status-details-bin` trailer is available as `details`, with shortcuts
for the common ones: `field_violations` (BadRequest), `retry_delay` (RetryInfo) and
`error_info` (ErrorInfo).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

from tokenrelay._status import (
    BadRequest,
    Detail,
    ErrorInfo,
    FieldViolation,
    RetryInfo,
    UnknownDetail,
    details_from_metadata,
)

__all__ = [
    "TokenRelayError", "InvalidArgumentError", "ResourceExhaustedError", "UnavailableError",
    "DeadlineExceededError", "NotFoundError", "AlreadyExistsError", "FailedPreconditionError",
    "CancelledError", "UnauthenticatedError", "PermissionDeniedError", "UnimplementedError",
    "InternalError", "FieldViolation", "RetryInfo", "ErrorInfo", "BadRequest", "UnknownDetail",
    "from_rpc_error",
]


class TokenRelayError(Exception):
    """A tokenrelay call failed. `code` is the grpc.StatusCode; `details` the decoded details."""

    def __init__(self, code: grpc.StatusCode, message: str, details: Iterable[Detail] = (),
                 *, request_id: str = "") -> None:
        self.code = code
        self.message = message
        self.details: tuple[Detail, ...] = tuple(details)
        self.request_id = request_id
        super().__init__(f"{code.name}: {message}")

    @property
    def field_violations(self) -> list[FieldViolation]:
        """(field, description) pairs from a BadRequest detail; empty when there is none."""
        return [v for d in self.details if isinstance(d, BadRequest) for v in d.field_violations]

    @property
    def retry_delay(self) -> float | None:
        """Seconds the server asked us to wait (RetryInfo); None when it did not say."""
        for detail in self.details:
            if isinstance(detail, RetryInfo):
                return detail.retry_delay
        return None

    @property
    def error_info(self) -> ErrorInfo | None:
        for detail in self.details:
            if isinstance(detail, ErrorInfo):
                return detail
        return None

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.code, self.message, self.details, self.request_id))


def _rebuild(cls: type[TokenRelayError], code: grpc.StatusCode, message: str,
             details: tuple[Detail, ...], request_id: str) -> TokenRelayError:
    return cls(code, message, details, request_id=request_id)


class InvalidArgumentError(TokenRelayError):
    """INVALID_ARGUMENT: a request field is out of range; see `field_violations`."""


class ResourceExhaustedError(TokenRelayError):
    """RESOURCE_EXHAUSTED: the server's queue is full; retry after `retry_delay` seconds."""


class UnavailableError(TokenRelayError):
    """UNAVAILABLE: the server is down, draining, or its engine is dead."""


class DeadlineExceededError(TokenRelayError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""


class NotFoundError(TokenRelayError):
    """NOT_FOUND: e.g. an unknown (or someone else's) job id."""


class AlreadyExistsError(TokenRelayError):
    """ALREADY_EXISTS: e.g. an idempotency key reused with a different request."""


class FailedPreconditionError(TokenRelayError):
    """FAILED_PRECONDITION: e.g. deleting a job that has not ended."""


class CancelledError(TokenRelayError):
    """CANCELLED: the call was cancelled (by the client or the server)."""


class UnauthenticatedError(TokenRelayError):
    """UNAUTHENTICATED: missing or wrong credentials."""


class PermissionDeniedError(TokenRelayError):
    """PERMISSION_DENIED: the credentials do not allow this call."""


class UnimplementedError(TokenRelayError):
    """UNIMPLEMENTED: the server does not offer this RPC."""


class InternalError(TokenRelayError):
    """INTERNAL (or UNKNOWN / DATA_LOSS): the server failed."""


_BY_CODE: dict[grpc.StatusCode, type[TokenRelayError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: FailedPreconditionError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}


def error_class(code: grpc.StatusCode) -> type[TokenRelayError]:
    return _BY_CODE.get(code, TokenRelayError)


def from_rpc_error(error: grpc.RpcError) -> TokenRelayError:
    """Turn a grpc.RpcError (sync or aio) into the matching TokenRelayError subclass."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = error.details() if callable(getattr(error, "details", None)) else str(error)
    trailers: Any = None
    if callable(getattr(error, "trailing_metadata", None)):
        trailers = error.trailing_metadata()
    status = details_from_metadata(trailers)
    request_id = ""
    for key, value in trailers or ():
        if key == "x-request-id" and isinstance(value, str):
            request_id = value
    code = code or grpc.StatusCode.UNKNOWN
    details = status.details if status is not None else ()
    return error_class(code)(code, message or "", details, request_id=request_id)
