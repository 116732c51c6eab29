"""Which transport carries the engine core's step frames: a microbenchmark, run side by side.

    python bench/core_transport.py [--steps 3000] [--batch 256] [--repeats 5]

One step frame = `StepOutputs` with `--batch` requests of one new token each, as columns (the
decode steady state the core sends every step). Each candidate sends `--steps` frames from a
child process to this one and we time end to end (encode in the child, transfer, decode here);
the runs are interleaved and repeated, and we report medians and ratios to the fastest:

- msgspec-socket: msgspec msgpack typed Structs, length-prefixed, over a Unix socketpair
  (what engines/core uses);
- pickle-pipe: the same Structs through multiprocessing.Connection (pickle per frame);
- msgspec-pipe: msgspec bytes through multiprocessing.Connection.send_bytes.

ZeroMQ is not measured: pyzmq is not a dependency, and with one core and N local front ends
a Unix socket per front end needs no broker, no extra library and gives EOF on process death,
which is how front ends detect a dead core within a second.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import time

import msgspec

from tokenrelay_engines.base import EngineStats, FinishReason
from tokenrelay_engines.core.messages import (
    FRAME_HEADER, FinishedRequest, FrameEncoder, StepOutputs, core_message_decoder,
)


def _frame(batch: int, step: int) -> StepOutputs:
    finished = [FinishedRequest("0", FinishReason.LENGTH)] if step % 50 == 0 else []
    return StepOutputs([str(i) for i in range(batch)], [1000 + (step + i) % 30000 for i in range(batch)],
                       finished=finished, stats=EngineStats(batch, 0, batch * 8, 8192))


def _send_socket(sock: socket.socket, steps: int, batch: int) -> None:
    enc = FrameEncoder()
    for step in range(steps):
        sock.sendall(enc.encode(_frame(batch, step)))
    sock.close()


def _send_pipe(conn, steps: int, batch: int, raw: bool) -> None:
    enc = msgspec.msgpack.Encoder()
    for step in range(steps):
        frame = _frame(batch, step)
        if raw:
            conn.send_bytes(enc.encode(frame))
        else:
            conn.send(frame)
    conn.close()


def run_socket(steps: int, batch: int) -> float:
    ours, theirs = socket.socketpair()
    proc = mp.get_context("spawn").Process(target=_send_socket, args=(theirs, steps, batch))
    dec = core_message_decoder()
    proc.start()
    theirs.close()
    started = None  # from the first frame on: the child's start-up is not the transport
    buf, got = bytearray(), 0
    while got < steps:
        data = ours.recv(1 << 20)
        if not data:
            break
        buf += data
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = FRAME_HEADER.unpack_from(buf, pos)
            if len(buf) - pos - 4 < n:
                break
            dec.decode(bytes(buf[pos + 4:pos + 4 + n]))
            pos += 4 + n
            got += 1
            if started is None:
                started = time.perf_counter()
        del buf[:pos]
    elapsed = time.perf_counter() - started
    proc.join()
    assert got == steps
    return elapsed


def run_pipe(steps: int, batch: int, raw: bool) -> float:
    ours, theirs = mp.get_context("spawn").Pipe(duplex=False)
    proc = mp.get_context("spawn").Process(target=_send_pipe, args=(theirs, steps, batch, raw))
    dec = core_message_decoder()
    proc.start()
    theirs.close()
    for i in range(steps):
        if i == 1:
            started = time.perf_counter()  # from the first frame on, as above
        if raw:
            dec.decode(ours.recv_bytes())
        else:
            ours.recv()
    elapsed = time.perf_counter() - started
    proc.join()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    candidates = {
        "msgspec-socket": lambda: run_socket(args.steps, args.batch),
        "pickle-pipe": lambda: run_pipe(args.steps, args.batch, raw=False),
        "msgspec-pipe": lambda: run_pipe(args.steps, args.batch, raw=True),
    }
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.repeats):
        for name, run in candidates.items():  # interleaved
            times[name].append(run())
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    best = min(medians.values())
    frame_bytes = len(FrameEncoder().encode(_frame(args.batch, 1)))
    print(f"{args.steps} frames of {args.batch} updates ({frame_bytes} bytes each), median of {args.repeats}:")
    for name, median in sorted(medians.items(), key=lambda kv: kv[1]):
        per_frame_us = median / (args.steps - 1) * 1e6
        print(f"  {name:15s} {per_frame_us:8.1f} us/frame  x{median / best:.2f} of the fastest")


if __name__ == "__main__":
    main()
