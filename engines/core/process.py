"""The engine-core process: the engine core behind a local socket, fed and drained by front ends.

    python -m tokenrelay_engines.core.process --config-json JSON --parent-pid PID
        (--socket-fd FD | --listen-fd FD)

A fresh interpreter (spawned, never forked from the server: no inherited threads, event loop or
CUDA state). It loads the runner, then serves connections: a connected socket the spawning
front end handed over (--socket-fd: the core exits when that front end goes), or a listening
Unix socket that several front ends connect to (--listen-fd, `--api-server-count N`).

One thread, one loop: read whatever commands arrived (without waiting while there is work),
apply them, run one engine step, send each front end one `StepOutputs` frame with its requests'
deltas. A front end that disconnects has its requests aborted. The core exits with its parent
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
import time

import msgspec

from tokenrelay_engines.config import TorchEngineConfig
from tokenrelay_engines.core.engine_core import EngineCore
from tokenrelay_engines.core.messages import (
    Abort, AddRequest, CoreDead, FrameEncoder, FrameReader, Hello, RequestUpdate, Shutdown, StepOutputs, Utility,
    UtilityResult, command_decoder,
)

log = logging.getLogger("tokenrelay.engine_core")
_RECV_BYTES = 1 << 20
_PR_SET_PDEATHSIG = 1


@dataclasses.dataclass(slots=True, eq=False)
class _Conn:
    index: int
    sock: socket.socket
    reader: FrameReader = dataclasses.field(default_factory=FrameReader)
    requests: set[str] = dataclasses.field(default_factory=set)  # core ids it owns


class CoreServer:
    def __init__(self, core: EngineCore, hello: Hello, *, listen: socket.socket | None = None,
                 connected: socket.socket | None = None) -> None:
        self.core = core
        self._hello = hello
        self._listen = listen
        self._exit_when_alone = connected is not None  # the spawning front end owns this core
        self._selector = selectors.DefaultSelector()
        self._conns: dict[int, _Conn] = {}
        self._owners: dict[str, tuple[_Conn, str]] = {}  # core id -> (front end, its id)
        self._encoder = FrameEncoder()
        self._decoder = command_decoder()
        self._next_conn = 0
        self._stopping = False
        if listen is not None:
            self._selector.register(listen, selectors.EVENT_READ, None)
        if connected is not None:
            self._open(connected)

    # ---- connections ---------------------------------------------------------------------

    def _open(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        conn = _Conn(self._next_conn, sock)
        self._next_conn += 1
        self._conns[conn.index] = conn
        self._selector.register(sock, selectors.EVENT_READ, conn)
        self._send(conn, self._hello)

    def _close(self, conn: _Conn) -> None:
        if self._conns.pop(conn.index, None) is None:
            return
        self._selector.unregister(conn.sock)
        conn.sock.close()
        ids = list(conn.requests)
        for core_id in ids:
            self._owners.pop(core_id, None)
        self.core.abort(ids)  # nobody reads these any more
        if self._exit_when_alone and not self._conns:
            self._stopping = True

    def _send(self, conn: _Conn, message: msgspec.Struct) -> None:
        try:
            conn.sock.sendall(self._encoder.encode(message))
        except OSError:
            self._close(conn)

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
            request = command.request
            core_id = f"{conn.index}:{request.request_id}"
            self._owners[core_id] = (conn, request.request_id)
            conn.requests.add(core_id)
            self._route(self.core.add(dataclasses.replace(request, request_id=core_id)), 0)
        elif isinstance(command, Abort):
            self._route(self.core.abort([f"{conn.index}:{rid}" for rid in command.request_ids]), 0)
        elif isinstance(command, Utility):
            self._send(conn, UtilityResult(command.call_id, self.core.stats()))
        elif isinstance(command, Shutdown):
            self._stopping = True

    # ---- outputs -------------------------------------------------------------------------

    def _route(self, updates: list[RequestUpdate], num_sampled: int) -> None:
        if not updates:
            return
        by_conn: dict[int, list[RequestUpdate]] = {}
        for update in updates:
            owner = self._owners.get(update.request_id)
            if owner is None:
                continue
            conn, client_id = owner
            if update.finish_reason is not None:
                del self._owners[update.request_id]
                conn.requests.discard(update.request_id)
            update.request_id = client_id
            by_conn.setdefault(conn.index, []).append(update)
        stats = self.core.stats()
        for index, batch in by_conn.items():
            conn = self._conns.get(index)
            if conn is not None:
                self._send(conn, StepOutputs(batch, stats, sum(len(u.token_ids) for u in batch)))

    # ---- the loop ------------------------------------------------------------------------

    def _idle_timeout(self) -> float | None:
        core = self.core
        if core.has_unfinished and not core.stalled:
            return 0.0
        deadline = core.next_deadline() if core.has_unfinished else None
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def run(self) -> int:
        core = self.core
        try:
            while not self._stopping:
                self._poll(self._idle_timeout())
                if self._stopping:
                    break
                if core.has_unfinished:
                    updates, num_sampled = core.step()
                    self._route(updates, num_sampled)
        except BaseException as exc:  # noqa: BLE001 - any failure kills the core, loudly
            log.exception("engine core loop failed; the engine is dead")
            reason = f"engine loop failed: {type(exc).__name__}: {exc}"
            for conn in list(self._conns.values()):
                self._send(conn, CoreDead(reason))
            return 1
        self._route(core.abort_all(), 0)
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
    from tokenrelay_engines.torch.runner import ModelRunner

    runner = ModelRunner(config)
    core = EngineCore(runner, config.scheduler)
    hello = Hello(core.model_info, runner.tokenizer.to_str(), core.limits.num_blocks, core.limits.block_size)
    if args.socket_fd is not None:
        server = CoreServer(core, hello, connected=socket.socket(fileno=args.socket_fd))
    else:
        server = CoreServer(core, hello, listen=socket.socket(fileno=args.listen_fd))
    return server.run()


if __name__ == "__main__":
    sys.exit(main())
