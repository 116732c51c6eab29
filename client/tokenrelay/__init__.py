"""tokenrelay client: generated tokenrelay.v1 stubs plus Client / AsyncClient.

    from tokenrelay import Client
    with Client() as client:  # TOKENRELAY_TARGET, else localhost:50051
        print(client.generate("Hello", max_tokens=16).text)
"""

from tokenrelay._status import ErrorInfo, FieldViolation, RetryInfo
from tokenrelay._streams import AsyncGenerationStream, GenerationStream
from tokenrelay._params import GenerationOptions
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
from tokenrelay.types import (
    FinishReason,
    GenerationResult,
    Job,
    JobError,
    JobEvent,
    JobPage,
    JobPriority,
    JobState,
    ModelInfo,
    ServerLoad,
    StateTransition,
    StreamDelta,
    StreamFinished,
    StreamStarted,
    SubmitResult,
    Timing,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__all__ = [
    "Client", "AsyncClient", "GenerationStream", "AsyncGenerationStream",
    "TokenRelayError", "InvalidArgumentError", "ResourceExhaustedError", "UnavailableError",
    "DeadlineExceededError", "NotFoundError", "AlreadyExistsError", "FailedPreconditionError",
    "CancelledError", "UnauthenticatedError", "PermissionDeniedError", "UnimplementedError",
    "InternalError", "FieldViolation", "RetryInfo", "ErrorInfo", "GenerationOptions",
    "FinishReason", "JobState", "JobPriority", "Usage", "Timing", "TopLogprob", "TokenLogprob",
    "GenerationResult", "StreamStarted", "StreamDelta", "StreamFinished", "JobError",
    "StateTransition", "Job", "SubmitResult", "JobPage", "JobEvent", "ModelInfo", "ServerLoad",
]
