"""The TextGeneration servicer: thin glue between gRPC calls and the engine.

Each call: resolve and validate the request id (params, else `x-request-id` metadata, else
generated), then echo it in `x-request-id` (trailing metadata; a stream also in initial metadata
at once); refuse when not serving; convert and validate (server.convert);
take an admission ticket; iterate the engine's deltas. Whatever way the call ends (done,
client cancel, deadline, error), the `finally` closes the engine iterator and aborts the
request, so its KV blocks are freed within one engine step. Errors go out via server.errors.

Coalescing: each read of an engine stream returns everything that arrived since the previous
read as one delta (engines/outputs.py), so a stream sends at most one message per read, and a
consumer that lags (a slow client pushing back through HTTP/2 flow control, or a busy event
loop) gets a few large messages, never one per token. A unary call only extends a list of ids
and a list of text parts per read and builds its one protobuf at the end.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections.abc import AsyncIterator

import grpc
from tokenrelay.v1 import generation_pb2, text_generation_pb2, text_generation_pb2_grpc

from tokenrelay_engines.base import (
    AsyncEngine, EngineDeadError, FinishReason, InvalidRequest, OutputKind, Request, RequestOutput,
)
from tokenrelay_server import convert
from tokenrelay_server.admission import AdmissionController
from tokenrelay_server.chat import ChatPrompts
from tokenrelay_server.errors import (
    Cancelled, DeadlineExceeded, EngineFailed, InvalidRequests, ServerDraining, abort, abort_on_error,
)
from tokenrelay_server.health import ServingState
from tokenrelay_server.limits import InputLimits

INLINE_TOKENIZE_CHARS = 4096  # longer texts are tokenized / detokenized off the event loop
INLINE_DETOKENIZE_IDS = 1024


_CALLS = itertools.count()


def engine_request_id(request_id: str) -> str:
    """The engine's id for one call: the client's id made unique in this process (a call counter),
    since clients may reuse theirs."""
    return f"{request_id}#{next(_CALLS):x}"


def call_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's gRPC deadline as a time.monotonic() instant, or None."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + max(0.0, remaining)


class EngineCall:
    """One request's run through the engine; `close()` always frees what it held."""

    def __init__(self, engine: AsyncEngine, request: Request) -> None:
        self._engine = engine
        self.request = request
        try:
            self._stream = engine.add_request(request)
        except InvalidRequest as exc:
            if isinstance(exc, InvalidRequests):
                raise
            raise InvalidRequests([(convert.with_params_prefix(exc.field), exc.description)]) from exc
        self.final: RequestOutput | None = None

    def __aiter__(self) -> EngineCall:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.final is not None:
            raise StopAsyncIteration
        out = await self._stream.__anext__()
        if out.finished:
            self.final = out
        return out

    async def close(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self.final is None:  # not after the final output: the id may be reused by then
                await self._engine.abort(self.request.request_id)


class TextGenerationServiceServicer(text_generation_pb2_grpc.TextGenerationServiceServicer):
    def __init__(self, engine: AsyncEngine, state: ServingState, admission: AdmissionController,
                 limits: InputLimits) -> None:
        self._engine = engine
        self._state = state
        self._admission = admission
        self._limits = limits
        self._chat = ChatPrompts(engine)

    async def _start(self, params: generation_pb2.GenerationParams, context: grpc.aio.ServicerContext, *,
                     stream: bool) -> str:
        """Resolve and validate the request id, then echo it: nothing unchecked reaches a header.

        Every call ends with it in its trailing metadata (errors included), which costs nothing:
        trailers go out with the status. A stream also sends it at once in initial metadata; a
        unary call does not, since that is one more write and completion per call (a fifth of a
        unary call's server CPU) and its response carries the id anyway."""
        rid = convert.request_id_from(params, context.invocation_metadata(), self._limits)
        echo = ((convert.REQUEST_ID_METADATA, rid),)
        context.set_trailing_metadata(echo)
        if stream:
            await context.send_initial_metadata(echo)
        return rid

    async def _build(self, params: generation_pb2.GenerationParams, request_id: str,
                     context: grpc.aio.ServicerContext) -> Request:
        self._state.check_accepting()
        arrival = time.monotonic()
        tokenize = self._engine.tokenize
        text = params.text if params.WhichOneof("prompt") == "text" else ""
        if len(text) > INLINE_TOKENIZE_CHARS and self._limits.check_text([], "", text):
            ids = await asyncio.to_thread(tokenize, text)  # keep the event loop responsive
            tokenize = lambda _text: ids  # noqa: E731
        build = functools.partial(
            convert.request_from_params, params, request_id=request_id, info=self._engine.info(),
            tokenize=tokenize, arrival_time=arrival, deadline=call_deadline(context), limits=self._limits,
            encode_chat=self._chat.encode)
        # Chat messages are rendered (Jinja) and tokenized: CPU work, off the event loop.
        req = await asyncio.to_thread(build) if params.WhichOneof("prompt") == "messages" else build()
        req.request_id = engine_request_id(request_id)
        return req

    async def _note_dead(self, exc: Exception) -> Exception:
        """An engine found dead marks the server dead at once (health NOT_SERVING)."""
        if isinstance(exc, EngineDeadError):
            await self._state.set_dead(str(exc))
        return exc

    def _status_on_error(self, context: grpc.aio.ServicerContext):
        """Around a handler's body: any failure aborts the call with its status."""
        return abort_on_error(context, self._note_dead)

    async def _ending_error(self, final: RequestOutput | None) -> Exception | None:
        """The status error for a request that did not finish normally, else None."""
        reason = final.finish_reason if final is not None else FinishReason.CANCELLED
        if reason is FinishReason.DEADLINE:
            return DeadlineExceeded("the request's deadline passed before generation finished")
        if reason is FinishReason.CANCELLED:
            if self._state.draining:
                return ServerDraining("request cancelled: the server is shutting down")
            return Cancelled("request cancelled")
        if reason is FinishReason.ERROR:
            try:
                await self._engine.check_health()
            except Exception as exc:  # noqa: BLE001 - the engine died under this request
                return exc if isinstance(exc, EngineDeadError) else EngineDeadError(str(exc))
            return EngineFailed(f"engine error: {final.error if final else 'unknown'}")
        return None

    async def Generate(self, request: text_generation_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> text_generation_pb2.GenerateResponse:
        async with self._status_on_error(context):
            rid = await self._start(request.params, context, stream=False)
            req = await self._build(request.params, rid, context)
            req.output_kind = OutputKind.FINAL_ONLY  # no per-step work: the whole result at the end
            with self._admission.try_acquire(len(req.prompt_token_ids)):
                call = EngineCall(self._engine, req)
                acc = convert.ResultAccumulator(rid, seed=req.sampling.seed,
                                                want_logprobs=req.sampling.logprobs is not None)
                try:
                    async for out in call:
                        acc.add(out)
                finally:
                    await call.close()
            error = await self._ending_error(call.final)
            if error is not None:
                raise error
            return text_generation_pb2.GenerateResponse(result=acc.result())

    async def GenerateStream(self, request: text_generation_pb2.GenerateStreamRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[text_generation_pb2.GenerateStreamResponse]:
        error: Exception | None = None
        try:
            rid = await self._start(request.params, context, stream=True)
            req = await self._build(request.params, rid, context)
            with self._admission.try_acquire(len(req.prompt_token_ids)):
                call = EngineCall(self._engine, req)
                try:
                    yield convert.stream_started(rid, req)
                    async for out in call:
                        delta = convert.stream_delta(out)
                        if delta is not None:
                            yield delta
                finally:
                    await call.close()
            # Exactly one end: a `finished` event for a normal end, else the error status alone.
            error = await self._ending_error(call.final)
            if error is None:
                yield convert.stream_finished(call.final)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a proper status
            error = exc
        if error is not None:
            await abort(context, await self._note_dead(error))

    async def Tokenize(self, request: text_generation_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> text_generation_pb2.TokenizeResponse:
        async with self._status_on_error(context):
            self._state.check_accepting()
            bad: list[tuple[str, str]] = []
            if not self._limits.check_text(bad, "text", request.text):
                raise InvalidRequests(bad)
            tokenize = functools.partial(self._engine.tokenize, request.text,
                                         add_special_tokens=request.add_special_tokens)
            ids = tokenize() if len(request.text) <= INLINE_TOKENIZE_CHARS else await asyncio.to_thread(tokenize)
            return text_generation_pb2.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: text_generation_pb2.DetokenizeRequest,
                         context: grpc.aio.ServicerContext) -> text_generation_pb2.DetokenizeResponse:
        async with self._status_on_error(context):
            self._state.check_accepting()
            bad: list[tuple[str, str]] = []
            if self._limits.check_token_ids(bad, "token_ids", len(request.token_ids)):
                convert.check_token_ids(bad, "token_ids", request.token_ids, self._engine.info().vocab_size)
            if bad:
                raise InvalidRequests(bad)
            detokenize = functools.partial(self._engine.detokenize, list(request.token_ids),
                                           skip_special_tokens=request.skip_special_tokens)
            text = (detokenize() if len(request.token_ids) <= INLINE_DETOKENIZE_IDS
                    else await asyncio.to_thread(detokenize))
            return text_generation_pb2.DetokenizeResponse(text=text)

    async def GetModelInfo(self, request: text_generation_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> text_generation_pb2.GetModelInfoResponse:
        async with self._status_on_error(context):
            self._state.check_accepting()
            return convert.model_info_to_proto(self._engine.info())

    async def GetServerLoad(self, request: text_generation_pb2.GetServerLoadRequest,
                            context: grpc.aio.ServicerContext) -> text_generation_pb2.GetServerLoadResponse:
        async with self._status_on_error(context):
            return convert.server_load_to_proto(
                self._engine.stats(), queue_depth=self._admission.in_flight,
                queue_capacity=self._admission.capacity, draining=self._state.draining)
