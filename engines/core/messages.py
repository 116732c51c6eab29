"""Typed frames between front ends and the engine core (msgspec msgpack, length-prefixed).

Front end -> core: `AddRequest`, `Abort`, `Utility`, `Shutdown` (the `Command` union).
Core -> front end: `Hello` once per connection (with the prefix that makes that front end's
request ids unique in the core), then one `StepOutputs` per engine step that touched one of
that front end's requests, `UtilityResult`, and `CoreDead` when the loop fails.

Only deltas cross, column by column: a `StepOutputs` carries the ids of the requests that
sampled this step and their new tokens as two flat lists, and the rare parts (logprobs, first
tokens, finished requests) sparsely, so a frame's size depends on the batch, never on how long
outputs have grown, and neither side builds an object per request per step. Nothing is pickled.
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


class FinishedRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """A request the core no longer holds: why it ended, and its timings and prefix-cache hits."""

    request_id: str
    finish_reason: FinishReason
    stop_token_id: int | None = None  # with STOP: the stop token id that ended it
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None


class StartedRequest(msgspec.Struct, array_like=True):
    """A request whose first output token is in this step: when it was first scheduled, and
    how many of its prompt tokens the prefix cache held (the final output reports them)."""

    request_id: str
    num_cached_tokens: int
    first_scheduled_time: float | None
    first_token_time: float | None


class Hello(msgspec.Struct, tag="hello", array_like=True):
    """What a front end needs to serve without the model: info, tokenizer, KV geometry."""

    model_info: ModelInfo
    tokenizer_json: str
    num_blocks: int
    block_size: int
    id_prefix: str = ""  # the front end starts each request id it sends with this
    priority_raised: bool = False  # the core raised its own priority (else front ends lower theirs)


class StepOutputs(msgspec.Struct, tag="step", array_like=True, omit_defaults=True):
    """One engine step's outputs for one front end, column by column.

    `request_ids[i]` sampled `token_ids[i]` this step (one token per request per step: the
    core sends every step, so a delta is at most one token). Everything rarer is sparse:
    `logprobs` only for requests that asked, `started` on a request's first token, `finished`
    when the core let a request go (with or without a token in this step; its token, if any,
    comes first). The front end applies a frame with one pass over the columns.
    """

    request_ids: list[str] = []
    token_ids: list[int] = []
    # request id -> (logprob of its token, ((id, logprob), ...) most likely first)
    logprobs: dict[str, tuple[float, list[tuple[int, float]]]] = {}
    started: list[StartedRequest] = []
    finished: list[FinishedRequest] = []
    stats: EngineStats | None = None

    def __len__(self) -> int:
        return len(self.request_ids) + len(self.finished)


class UtilityResult(msgspec.Struct, tag="result", array_like=True):
    call_id: int
    stats: EngineStats


class CoreDead(msgspec.Struct, tag="dead", array_like=True):
    reason: str


class Heartbeat(msgspec.Struct, tag="beat", array_like=True):
    """Sent every HEARTBEAT_INTERVAL_S by a thread of the core process, however long a step
    takes: a front end that hears nothing for HEARTBEAT_TIMEOUT_S takes the core for hung."""


HEARTBEAT_INTERVAL_S = 0.2
HEARTBEAT_TIMEOUT_S = 0.7  # with the front end's check every 0.1 s: a hung core is seen within 1 s

CoreMessage = Hello | StepOutputs | UtilityResult | CoreDead | Heartbeat


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
