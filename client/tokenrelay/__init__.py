"""tokenrelay client: generated tokenrelay.v1 stubs plus Client / AsyncClient.

    from tokenrelay import Client
    with Client("localhost:50051") as client:
        print(client.generate("Hello", max_tokens=16).text)
"""

from tokenrelay._status import ErrorInfo, FieldViolation, RetryInfo
from tokenrelay._streams import AsyncGenerationStream, GenerationStream
from tokenrelay.client import AsyncClient, Client
from tokenrelay.errors import (
    AlreadyExistsError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    TokenRelayError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)

__all__ = [
    "Client", "AsyncClient", "GenerationStream", "AsyncGenerationStream",
    "TokenRelayError", "InvalidArgumentError", "ResourceExhaustedError", "UnavailableError",
    "DeadlineExceededError", "NotFoundError", "AlreadyExistsError", "FailedPreconditionError",
    "CancelledError", "UnauthenticatedError", "PermissionDeniedError", "UnimplementedError",
    "InternalError", "FieldViolation", "RetryInfo", "ErrorInfo",
]
