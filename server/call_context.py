"""What the server knows about the RPC being handled, for logs, metrics and tenancy.

One `CallInfo` per call, created by the outermost of the server's own interceptors and held in
a context variable: grpc.aio runs each call in its own task, so everything awaited by the
handler (servicer, engine wrapper, log records) sees the same object and nothing else does.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

from tokenrelay_server.tenants import TenantLimits


@dataclass(slots=True)
class CallInfo:
    method: str  # "/package.Service/Method"
    request_id: str = ""
    tenant: str = ""  # "" when authentication is off
    limits: TenantLimits = field(default_factory=TenantLimits)
    trace_id: str = ""  # 32 hex digits when tracing is on
    traceparent: str = ""  # W3C traceparent of the call's server span when tracing is on
    prompt_tokens: int = 0
    completion_tokens: int = 0


_CURRENT: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("tokenrelay_call", default=None)


def current() -> CallInfo | None:
    """The call being handled by this task, or None outside an RPC (start-up, job workers)."""
    return _CURRENT.get()


def current_tenant() -> str:
    info = _CURRENT.get()
    return info.tenant if info is not None else ""


def enter(method: str) -> tuple[CallInfo, contextvars.Token | None]:
    """The call's CallInfo, made and bound when no outer interceptor did; pass the token to leave()."""
    info = _CURRENT.get()
    if info is not None and info.method == method:
        return info, None
    info = CallInfo(method=method)
    return info, _CURRENT.set(info)


def leave(token: contextvars.Token | None) -> None:
    if token is not None:
        try:
            _CURRENT.reset(token)
        except ValueError:  # reset from another context (an async generator finalised elsewhere)
            _CURRENT.set(None)
