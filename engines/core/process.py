"""The engine-core process: the engine core behind a local socket, fed and drained by front ends.

    python -m tokenrelay_engines.core.process --config-json JSON --parent-pid PID
        (--socket-fd FD | --listen-fd FD)

A fresh interpreter (spawned, never forked from the server: no inherited threads, event loop or
CUDA state). It loads the runner, then serves connections: a connected socket the spawning
front end handed over (--socket-fd: the core exits when that front end goes), or a listening
Unix socket that several front ends connect to (--listen-fd, `--api-server-count N`).

One thread, one loop: read whatever commands arrived (without waiting while there is work),
apply them, run one engine step, send each front end one `StepOutputs` frame with its requests'
outputs. Each connection's Hello gives it an id prefix, so request ids are unique in the core as
the front ends send them: nothing is renamed per request, and with one front end a step's
outputs go out as they are. A front end that disconnects has its requests aborted. The core exits with its parent
(PR_SET_PDEATHSIG), and on a loop failure tells every front end (`CoreDead`) and exits 1.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time

import msgspec

from tokenrelay_engines.config import TorchEngineConfig
from tokenrelay_engines.core.engine_core import EngineCore
from tokenrelay_engines.core.messages import (
    HEARTBEAT_INTERVAL_S, Abort, AddRequest, CoreDead, FrameEncoder, FrameReader, Heartbeat, Hello, Shutdown,
    StepOutputs, Utility, UtilityResult, command_decoder,
)
from tokenrelay_engines.core.priority import shift_priority

log = logging.getLogger("tokenrelay.engine_core")
_RECV_BYTES = 1 << 20
_PR_SET_PDEATHSIG = 1


@dataclasses.dataclass(slots=True, eq=False)
class _Conn:
    index: int
    sock: socket.socket
    reader: FrameReader = dataclasses.field(default_factory=FrameReader)
    prefix: str = ""  # every request id it sends starts with this


class CoreServer:
    def __init__(self, core: EngineCore, hello: Hello, *, listen: socket.socket | None = None,
                 connected: socket.socket | None = None) -> None:
        self.core = core
        self._hello = hello
        self._listen = listen
        self._exit_when_alone = connected is not None  # the spawning front end owns this core
        self._selector = selectors.DefaultSelector()
        self._conns: dict[int, _Conn] = {}
        self._encoder = FrameEncoder()
        self._decoder = command_decoder()
        self._next_conn = 0
        self._stopping = False
        self._send_lock = threading.Lock()  # the loop and the heartbeat thread both send
        self._beating = threading.Event()  # set: stop the heartbeat thread
        if listen is not None:
            self._selector.register(listen, selectors.EVENT_READ, None)
        if connected is not None:
            self._open(connected)

    # ---- connections ---------------------------------------------------------------------

    def _open(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        conn = _Conn(self._next_conn, sock, prefix=f"{self._next_conn}:")
        self._next_conn += 1
        self._conns[conn.index] = conn
        self._selector.register(sock, selectors.EVENT_READ, conn)
        self._send(conn, msgspec.structs.replace(self._hello, id_prefix=conn.prefix))

    def _close(self, conn: _Conn) -> None:
        if self._conns.pop(conn.index, None) is None:
            return
        self._selector.unregister(conn.sock)
        conn.sock.close()
        self.core.abort(self.core.held_with_prefix(conn.prefix))  # nobody reads these any more
        if self._exit_when_alone and not self._conns:
            self._stopping = True

    def _send(self, conn: _Conn, message: msgspec.Struct) -> None:
        try:
            with self._send_lock:
                conn.sock.sendall(self._encoder.encode(message))
        except OSError:
            self._close(conn)

    def _heartbeat(self) -> None:
        """Thread: a Heartbeat to every front end every HEARTBEAT_INTERVAL_S. It needs the GIL
        only briefly (torch releases it in the forward pass), so a long step does not silence it;
        a stopped or hung process does. Send errors are left to the loop (EOF on its read)."""
        frame = bytes(FrameEncoder().encode(Heartbeat()))
        while not self._beating.wait(HEARTBEAT_INTERVAL_S):
            for conn in list(self._conns.values()):
                try:
                    with self._send_lock:
                        conn.sock.sendall(frame)
                except OSError:
                    pass

    # ---- commands ------------------------------------------------------------------------

    def _poll(self, timeout: float | None) -> None:
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                sock, _ = self._listen.accept()  # type: ignore[union-attr]
                self._open(sock)
                continue
            conn: _Conn = key.data
            try:
                data = conn.sock.recv(_RECV_BYTES)
            except OSError:
                data = b""
            if not data:
                self._close(conn)
                continue
            for frame in conn.reader.feed(data):
                self._apply(conn, self._decoder.decode(frame))

    def _apply(self, conn: _Conn, command) -> None:
        if isinstance(command, AddRequest):
            self._route(self.core.add(command.request))  # its id starts with conn.prefix
        elif isinstance(command, Abort):
            self._route(self.core.abort(command.request_ids))
        elif isinstance(command, Utility):
            self._send(conn, UtilityResult(command.call_id, self.core.stats()))
        elif isinstance(command, Shutdown):
            self._stopping = True

    # ---- outputs -------------------------------------------------------------------------

    def _route(self, step: StepOutputs) -> None:
        if not step:
            return
        step.stats = self.core.stats()
        conns = self._conns
        if len(conns) == 1:  # the common case: every output is its (a closed front end's were aborted)
            self._send(next(iter(conns.values())), step)
            return
        for conn in list(conns.values()):
            part = self._part(conn.prefix, step)
            if part:
                self._send(conn, part)

    @staticmethod
    def _part(prefix: str, step: StepOutputs) -> StepOutputs:
        """The share of `step` that belongs to the front end whose ids start with `prefix`."""
        keep = [i for i, rid in enumerate(step.request_ids) if rid.startswith(prefix)]
        ids = step.request_ids
        return StepOutputs(
            [ids[i] for i in keep], [step.token_ids[i] for i in keep],
            {rid: lp for rid, lp in step.logprobs.items() if rid.startswith(prefix)},
            [s for s in step.started if s.request_id.startswith(prefix)],
            [f for f in step.finished if f.request_id.startswith(prefix)], step.stats)

    # ---- the loop ------------------------------------------------------------------------

    def _idle_timeout(self) -> float | None:
        core = self.core
        if core.has_unfinished and not core.stalled:
            return 0.0
        deadline = core.next_deadline() if core.has_unfinished else None
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def run(self) -> int:
        core = self.core
        beat = threading.Thread(target=self._heartbeat, name="tokenrelay-core-heartbeat", daemon=True)
        beat.start()
        try:
            return self._run(core)
        finally:
            self._beating.set()
            beat.join(timeout=2 * HEARTBEAT_INTERVAL_S)

    def _run(self, core: EngineCore) -> int:
        try:
            while not self._stopping:
                self._poll(self._idle_timeout())
                if self._stopping:
                    break
                if core.has_unfinished:
                    self._route(core.step())
        except BaseException as exc:  # noqa: BLE001 - any failure kills the core, loudly
            log.exception("engine core loop failed; the engine is dead")
            reason = f"engine loop failed: {type(exc).__name__}: {exc}"
            for conn in list(self._conns.values()):
                self._send(conn, CoreDead(reason))
            return 1
        self._route(core.abort_all())
        for conn in list(self._conns.values()):
            self._close(conn)
        return 0


def die_with_parent(parent_pid: int) -> None:
    """SIGTERM this process when the process that spawned it exits (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent is gone already
        sys.exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenrelay_engines.core.process",
                                     description="tokenrelay engine core (spawned by the server)")
    parser.add_argument("--config-json", required=True, help="the TorchEngineConfig, as JSON")
    parser.add_argument("--parent-pid", type=int, required=True)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket-fd", type=int, help="a connected socket to the one front end that owns this core")
    where.add_argument("--listen-fd", type=int, help="a listening Unix socket front ends connect to")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s engine-core %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end decides when to stop (Ctrl-C hits the group)
    config = msgspec.json.decode(args.config_json, type=TorchEngineConfig)
    raised = config.core_priority > 0 and shift_priority(-config.core_priority)  # before any thread starts
    from tokenrelay_engines.torch.runner import ModelRunner

    runner = ModelRunner(config)
    core = EngineCore(runner, config.scheduler)
    hello = Hello(core.model_info, runner.tokenizer.to_str(), core.limits.num_blocks, core.limits.block_size,
                  priority_raised=raised)
    if args.socket_fd is not None:
        server = CoreServer(core, hello, connected=socket.socket(fileno=args.socket_fd))
    else:
        server = CoreServer(core, hello, listen=socket.socket(fileno=args.listen_fd))
    return server.run()


if __name__ == "__main__":
    sys.exit(main())
