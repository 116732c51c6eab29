"""Every error the server returns is mapped here, once, to a gRPC status with google.rpc details.

Servicers raise domain exceptions (`InvalidRequest`, `AdmissionRejected`, `ServerDraining`,
`EngineDeadError`, `NotFound`, ...) inside `abort_on_error`, which turns them into
`context.abort(...)`, the status's details in its trailers. Nothing is ever returned with status
OK on failure.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from tokenrelay_engines.base import EngineDeadError, InvalidRequest

log = logging.getLogger(__name__)
ERROR_DOMAIN = "tokenrelay.dev"
# Error trailers stay a few KiB whatever the input: violations capped, texts truncated.
MAX_VIOLATIONS = 10
MAX_FIELD_CHARS = 96
MAX_DESCRIPTION_CHARS = 160
MAX_MESSAGE_CHARS = 512
MAX_METADATA_VALUE_CHARS = 96


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def bounded_violations(violations: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """At most MAX_VIOLATIONS, each clipped; a last entry counts the rest."""
    out = [(_clip(f, MAX_FIELD_CHARS), _clip(d, MAX_DESCRIPTION_CHARS)) for f, d in violations[:MAX_VIOLATIONS]]
    if len(violations) > MAX_VIOLATIONS:
        out.append(("...", f"{len(violations) - MAX_VIOLATIONS} more violations not listed"))
    return out


class ServerError(Exception):
    """Base of the server's own errors; `code` is the gRPC status code."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequests(InvalidRequest):
    """Several bad fields at once: each (field path, description). `field` is the first."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        if not violations:
            raise ValueError("InvalidRequests needs at least one violation")
        super().__init__(*violations[0])
        self.violations = list(violations)
        self.args = ("; ".join(f"{f}: {d}" for f, d in violations),)


class AdmissionRejected(ServerError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float, reason: str = "QUEUE_FULL") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason
        self.metadata: dict[str, str] = {}  # ErrorInfo metadata (e.g. the tenant and its quota)


class ServerDraining(ServerError):
    code = grpc.StatusCode.UNAVAILABLE


class NotReady(ServerError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServerError):
    code = grpc.StatusCode.CANCELLED


class NotFound(ServerError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(ServerError):
    """A resource with this key exists; `reason` and `metadata` go out as google.rpc.ErrorInfo."""

    code = grpc.StatusCode.ALREADY_EXISTS

    def __init__(self, message: str, reason: str = "ALREADY_EXISTS", **metadata: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.metadata = metadata


class Unauthenticated(ServerError):
    code = grpc.StatusCode.UNAUTHENTICATED


class EngineFailed(ServerError):
    code = grpc.StatusCode.INTERNAL


def _pack(status: status_pb2.Status, detail) -> None:
    status.details.add().Pack(detail)


def _error_info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata={
        k: _clip(v, MAX_METADATA_VALUE_CHARS) for k, v in metadata.items()})


def to_status(exc: BaseException) -> status_pb2.Status:
    """The google.rpc.Status for `exc` (never OK)."""
    if isinstance(exc, InvalidRequest):
        violations = bounded_violations(
            exc.violations if isinstance(exc, InvalidRequests) else [(exc.field, exc.description)])
        status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=_clip(
            "; ".join(f"{f}: {d}" for f, d in violations), MAX_MESSAGE_CHARS))
        _pack(status, error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations]))
        return status
    if isinstance(exc, EngineDeadError):
        status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=_clip(f"engine unavailable: {exc}",
                                                                           MAX_MESSAGE_CHARS))
        _pack(status, _error_info("ENGINE_DEAD"))
        return status
    if not isinstance(exc, ServerError):
        log.exception("unexpected error in handler", exc_info=exc)
        return status_pb2.Status(code=code_pb2.INTERNAL, message=f"internal error: {type(exc).__name__}")
    code = exc.code.value[0]
    if code == code_pb2.OK:  # pragma: no cover - guarded: never report an error as OK
        code = code_pb2.INTERNAL
    status = status_pb2.Status(code=code, message=_clip(exc.message, MAX_MESSAGE_CHARS))
    if isinstance(exc, AdmissionRejected):
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(max(0, round(exc.retry_after_s * 1000)))
        _pack(status, error_details_pb2.RetryInfo(retry_delay=delay))
        _pack(status, _error_info(exc.reason, **exc.metadata))
    elif isinstance(exc, ServerDraining):
        _pack(status, _error_info("DRAINING"))
    elif isinstance(exc, NotReady):
        _pack(status, _error_info("NOT_READY"))
    elif isinstance(exc, AlreadyExists):
        _pack(status, _error_info(exc.reason, **exc.metadata))
    return status


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    """Abort the call with the status for `exc`, keeping the trailing metadata set so far (the
    request id); raises (as grpc.aio's abort does)."""
    status = rpc_status.to_status(to_status(exc))
    await context.abort(status.code, status.details,
                        tuple(context.trailing_metadata() or ()) + tuple(status.trailing_metadata))


@contextlib.asynccontextmanager
async def abort_on_error(context: grpc.aio.ServicerContext,
                         on_error: Callable[[Exception], Awaitable[Exception]] | None = None
                         ) -> AsyncIterator[None]:
    """Around a handler's body: any failure aborts the call with its status (abort raises).

    `on_error` may look at the failure first and return the exception to report.
    """
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every failure becomes a proper status
        await abort(context, await on_error(exc) if on_error is not None else exc)
        raise  # unreachable: abort raises
