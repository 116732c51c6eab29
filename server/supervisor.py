"""`--api-server-count N`: N front-end processes on one port over one engine-core process.

    main process (this module; supervises, serves nothing)
      |- engine core   python -m tokenrelay_engines.core.process --listen-fd   (Unix socket)
      |- front end 0   serve(): gRPC + jobs + health port + metrics port
      |- front end 1.. serve(): gRPC only (TextGeneration, health), same port via SO_REUSEPORT

Every front end connects to the core's Unix socket; the kernel spreads new connections over the
front ends. Jobs run in exactly one process, front end 0: the job store is single-writer per
replica (SQLite) and a job must run once; the other front ends answer the Jobs API with
UNIMPLEMENTED, so with N > 1 send job calls to a replica with N = 1, or accept that only some
connections reach front end 0 (a known limit of this first version). The health-only port and
the metrics port are front end 0's too.

Any front end exiting ends the group: the others are stopped, then the core, and the main
process exits with the first non-zero code (3 when the engine died). SIGTERM/SIGINT are
forwarded once to every front end, which drain as a single server does.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from tokenrelay_server.config import ServerConfig

log = logging.getLogger("tokenrelay.supervisor")
_STOP_TIMEOUT_S = 60.0


def front_end_config(config: ServerConfig, index: int, port: int, core_address: str) -> ServerConfig:
    first = index == 0
    return dataclasses.replace(
        config, port=port, api_server_count=1, engine_core_address=core_address,
        jobs=config.jobs if first else None,
        security=config.security if first else dataclasses.replace(config.security, health_port=None),
        telemetry=config.telemetry if first else dataclasses.replace(config.telemetry, metrics_port=None))


def _front_end(config: ServerConfig, index: int, parent_pid: int, ready: mp.connection.Connection) -> None:
    """A front-end process (spawned): serve until told to stop; exit with serve's code."""
    from tokenrelay_engines.core.process import die_with_parent
    from tokenrelay_server.logs import configure_logging
    from tokenrelay_server.main import exit_now, run_loop, serve

    die_with_parent(parent_pid)
    os.setsid()  # the terminal's Ctrl-C reaches the supervisor only; it forwards one SIGTERM
    configure_logging(config.log_level, config.telemetry.log_format)
    code = run_loop(config, serve(config, on_ready=lambda _handle: ready.send(index)))
    exit_now(code)


def _reserve_port(host: str) -> socket.socket:
    """An ephemeral port held (bound, not listening) in the SO_REUSEPORT group until exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host or "0.0.0.0", 0))
    return sock


def run_supervised(config: ServerConfig) -> int:
    from tokenrelay_engines.core.client import spawn_engine_core

    workdir = Path(tempfile.mkdtemp(prefix="tokenrelay-core-"))
    address = str(workdir / "core.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(64)
    core = spawn_engine_core(config.torch, listen_fd=listener.fileno(), log_level=config.log_level)
    listener.close()
    reserved = _reserve_port(config.host) if config.port == 0 else None
    port = reserved.getsockname()[1] if reserved is not None else config.port
    ctx = mp.get_context("spawn")
    ready_r, ready_w = ctx.Pipe(duplex=False)
    front_ends = [ctx.Process(target=_front_end, name=f"tokenrelay-front-end-{i}",
                              args=(front_end_config(config, i, port, address), i, os.getpid(), ready_w))
                  for i in range(config.api_server_count)]
    stopping = False

    def forward(signum: int, _frame) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        log.info("received %s: stopping %d front ends", signal.Signals(signum).name, len(front_ends))
        for proc in front_ends:
            if proc.pid is not None and proc.exitcode is None:
                os.kill(proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    core_exit = os.pidfd_open(core.pid)
    code = 0
    try:
        for proc in front_ends:
            proc.start()
        ready_w.close()
        pending = {proc.sentinel: proc for proc in front_ends}
        while pending:
            waitables = [*pending, core_exit] if core.poll() is None else [*pending]
            for ready in multiprocessing.connection.wait(waitables):
                if ready is core_exit:
                    log.error("the engine core exited (code %s): front ends will exit", core.poll())
                    continue
                proc = pending.pop(ready)
                proc.join()
                if proc.exitcode and not code:
                    code = proc.exitcode if proc.exitcode > 0 else 1
                    log.error("%s exited with code %s: stopping the others", proc.name, proc.exitcode)
                    forward(signal.SIGTERM, None)
                elif not stopping:
                    forward(signal.SIGTERM, None)  # one front end left: stop the group
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in front_ends:
            if proc.exitcode is None and proc.pid is not None:
                proc.kill()
                proc.join()
        if core.poll() is None:
            core.terminate()
            if hasattr(signal, "SIGCONT"):  # a stopped (hung) core takes the SIGTERM only once continued
                os.kill(core.pid, signal.SIGCONT)
            try:
                core.wait(_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                core.kill()
                core.wait()
        os.close(core_exit)
        if reserved is not None:
            reserved.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return code
