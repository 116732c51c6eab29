"""One helper for grpc.aio server interceptors that run code around a handler's behaviour.

An interceptor that needs the servicer context (the peer's certificate, the final status
code) cannot work in `intercept_service` alone: it wraps the handler's behaviour instead.
`wrap_handler(handler, around)` rebuilds the RpcMethodHandler so that every call runs inside
`around(request, context)`, an async context manager; streaming responses included.
`WrappedHandlers` keeps one wrapped handler per method, so an interceptor does not rebuild the
handler and its closures on every call (a fixed per-RPC cost a unary call pays in full).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc

Around = Callable[[Any, grpc.aio.ServicerContext], AbstractAsyncContextManager[Any]]


def wrap_handler(handler: grpc.RpcMethodHandler | None, around: Around) -> grpc.RpcMethodHandler | None:
    """`handler` with each call's behaviour run inside `around(request, context)`."""
    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        behavior, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        behavior, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        behavior, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        behavior, factory = handler.unary_unary, grpc.unary_unary_rpc_method_handler

    if handler.response_streaming:
        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with around(request, context):
                result = behavior(request, context)
                if hasattr(result, "__aiter__"):
                    async for response in result:
                        yield response
                else:  # a handler written with context.write(): nothing to iterate
                    await result

        wrapped: Callable[..., Any] = streaming
    else:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with around(request, context):
                return await behavior(request, context)

        wrapped = unary
    return factory(wrapped, request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


class WrappedHandlers:
    """Wrapped handlers by method, each built once from `around_for(method)`.

    Bounded by the service's methods: a call to an unknown method has no handler (None), which
    is passed through and never cached."""

    def __init__(self, around_for: Callable[[str], Around]) -> None:
        self._around_for = around_for
        self._by_method: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, method: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        if handler is None:
            return None
        hit = self._by_method.get(method)
        if hit is not None and hit[0] is handler:
            return hit[1]
        wrapped = wrap_handler(handler, self._around_for(method))
        assert wrapped is not None
        self._by_method[method] = (handler, wrapped)
        return wrapped


def metadata_value(metadata: Any, key: str) -> str:
    """The first value of `key` in invocation metadata, as text ("" when absent)."""
    for k, v in metadata or ():
        if k == key:
            return v if isinstance(v, str) else v.decode("utf-8", "replace")
    return ""
