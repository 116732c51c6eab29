"""Typed frames between front ends and the engine core (msgspec msgpack, length-prefixed).

Front end -> core: `AddRequest`, `Abort`, `Utility`, `Shutdown` (the `Command` union).
Core -> front end: `Hello` once per connection, then one `StepOutputs` per engine step that
touched one of that front end's requests, `UtilityResult`, and `CoreDead` when the loop fails.

Only deltas cross: a `RequestUpdate` carries the token ids sampled since the previous update of
that request, so a frame's size depends on the batch, never on how long outputs have grown.
Nothing is pickled.
"""

from __future__ import annotations

import struct

import msgspec

from tokenrelay_engines.base import EngineStats, FinishReason, ModelInfo, Request

FRAME_HEADER = struct.Struct("!I")  # payload length, network order
MAX_FRAME_BYTES = 1 << 30


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    """A request, already validated and tokenized; its seed resolved, stop strings removed
    (the front end matches them and sends `Abort` on a match)."""

    request: Request


class Abort(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]


class Utility(msgspec.Struct, tag="utility", array_like=True):
    call_id: int
    method: str  # "stats"


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


Command = AddRequest | Abort | Utility | Shutdown


class RequestUpdate(msgspec.Struct, array_like=True, omit_defaults=True):
    """One request's delta from one step. `finish_reason` set: the core no longer holds it."""

    request_id: str
    token_ids: list[int]
    # one (token id, logprob, ((id, logprob), ...)) per new token, when the request asked
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None  # with STOP: the stop token id that ended it
    # timings and prefix-cache hits: on a request's first delta and on its final one
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None


class Hello(msgspec.Struct, tag="hello", array_like=True):
    """What a front end needs to serve without the model: info, tokenizer, KV geometry."""

    model_info: ModelInfo
    tokenizer_json: str
    num_blocks: int
    block_size: int


class StepOutputs(msgspec.Struct, tag="step", array_like=True):
    updates: list[RequestUpdate]
    stats: EngineStats
    num_new_tokens: int  # sampled this step for this front end's requests


class UtilityResult(msgspec.Struct, tag="result", array_like=True):
    call_id: int
    stats: EngineStats


class CoreDead(msgspec.Struct, tag="dead", array_like=True):
    reason: str


CoreMessage = Hello | StepOutputs | UtilityResult | CoreDead


class FrameReader:
    """Splits a byte stream into frames; feed it what recv() returned."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames: list[bytes] = []
        pos, size = 0, len(self._buf)
        while size - pos >= FRAME_HEADER.size:
            (n,) = FRAME_HEADER.unpack_from(self._buf, pos)
            if n > MAX_FRAME_BYTES:
                raise ValueError(f"frame of {n} bytes exceeds the limit")
            if size - pos - FRAME_HEADER.size < n:
                break
            start = pos + FRAME_HEADER.size
            frames.append(bytes(self._buf[start:start + n]))
            pos = start + n
        if pos:
            del self._buf[:pos]
        return frames


class FrameEncoder:
    """msgpack with the length prefix in one buffer (one send per frame)."""

    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()

    def encode(self, message: msgspec.Struct) -> bytearray:
        buf = bytearray(FRAME_HEADER.size)
        self._encoder.encode_into(message, buf, FRAME_HEADER.size)
        FRAME_HEADER.pack_into(buf, 0, len(buf) - FRAME_HEADER.size)
        return buf


def command_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(Command)


def core_message_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(CoreMessage)
