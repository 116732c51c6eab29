"""How bench/peers.py drives each kind of engine: a tokenrelay gRPC server, an OpenAI-compatible
HTTP server (llama-cpp-python, vLLM), or an offline worker (bench/peer_workers.py).

Every kind answers `batch1(text, ids, n)` -> {ttft_ms, ms_per_token} and
`concurrent(texts, ids, n)` -> {output_tokens_per_s, output_tokens}. Servers are driven by one
client thread per in-flight request, all streaming, timed on this side of the wire.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))


class PeerError(RuntimeError):
    pass


def _timed_stream(events) -> tuple[float, float, float, int]:
    """events yields token counts as they arrive -> (start, first, last, tokens)."""
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    for count in events:
        if count <= 0:
            continue
        last = time.perf_counter()
        if not tokens:
            first = last
        tokens += count
    if not tokens:
        raise PeerError("no tokens came back")
    return start, first, last, tokens


def _batch1(stream_one) -> dict:
    start, first, last, tokens = stream_one()
    return {"ttft_ms": 1000 * (first - start), "ms_per_token": 1000 * (last - first) / max(tokens - 1, 1),
            "output_tokens": tokens}


def _concurrent(stream_one, jobs: list) -> dict:
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        start = time.perf_counter()
        results = list(pool.map(stream_one, jobs))
        elapsed = time.perf_counter() - start
    tokens = sum(r[3] for r in results)
    return {"output_tokens_per_s": tokens / elapsed, "output_tokens": tokens, "elapsed_s": elapsed}


class _ServerProcess:
    def __init__(self, cmd: list[str], env: dict[str, str], cwd: str | None = None) -> None:
        self.cmd, self.env, self.cwd = cmd, env, cwd
        self.proc: subprocess.Popen | None = None
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"peer-{os.getpid()}-{id(self)}.log"

    def spawn(self) -> None:
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PeerError(f"exited with {self.proc.returncode}: {self.tail()}")
            if ready():
                return
            time.sleep(0.5)  # polling a child process's readiness, bounded by the deadline
        raise PeerError(f"not ready after {timeout:.0f}s: {self.tail()}")

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-400:].replace("\n", " | ")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            self.log.close()
            self.log_path.unlink(missing_ok=True)


class GrpcPeer:
    """tokenrelay's own server (`serve`), streamed with the tokenrelay client."""

    def __init__(self, name: str, how: str, cmd: list[str], env: dict[str, str], tree: str, free_port) -> None:
        self.name, self.how = name, how
        self.port = free_port()
        self.server = _ServerProcess([*cmd, "--port", str(self.port)], env, cwd=tree)
        self.target = f"127.0.0.1:{self.port}"

    def start(self, timeout: float) -> None:
        from tokenrelay import Client

        self.server.spawn()

        def ready() -> bool:
            try:
                with Client(self.target, retries=0) as c:
                    c.info(timeout=2)
                return True
            except Exception:  # not listening yet
                return False

        self.server.wait_ready(ready, timeout)
        self.client = Client(self.target)
        self.batch1("warm", [1] * 8, 4)

    def _stream(self, ids: list[int], n: int):
        stream = self.client.stream(ids, max_tokens=n, ignore_eos=True, temperature=0.0, timeout=600)
        for delta in stream:
            yield len(delta.token_ids)

    def batch1(self, text: str, ids: list[int], n: int) -> dict:
        return _batch1(lambda: _timed_stream(self._stream(ids, n)))

    def concurrent(self, texts: list[str], ids: list[list[int]], n: int) -> dict:
        return _concurrent(lambda p: _timed_stream(self._stream(p, n)), ids)

    def stop(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
        self.server.stop()


class HttpPeer:
    """An OpenAI-compatible /v1/completions server, streamed over server-sent events."""

    def __init__(self, name: str, how: str, cmd: list[str], env: dict[str, str], port: int,
                 ignore_eos_bias: bool, start_timeout: float = 300.0) -> None:
        self.name, self.how, self.port = name, how, port
        self.server = _ServerProcess(cmd, env)
        self.ignore_eos_bias = ignore_eos_bias
        self.model = ""

    def start(self, timeout: float) -> None:
        self.server.spawn()

        def ready() -> bool:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/v1/models")
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                if resp.status != 200:
                    return False
                data = json.loads(body).get("data") or [{}]
                self.model = data[0].get("id", "")
                return True
            except (OSError, ValueError, http.client.HTTPException):
                return False

        self.server.wait_ready(ready, timeout)
        self.batch1("warm up", [], 4)

    def _stream(self, text: str, n: int):
        body = {"prompt": text, "max_tokens": n, "temperature": 0.0, "stream": True, "model": self.model}
        if self.ignore_eos_bias:
            body["logit_bias"] = {"0": -100.0, "2": -100.0}  # llama-cpp-python has no ignore_eos
        else:
            body.update(ignore_eos=True, min_tokens=n)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise PeerError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
            for raw in resp:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    break
                chunk = json.loads(payload)
                if chunk.get("choices"):
                    yield 1
        finally:
            conn.close()

    def batch1(self, text: str, ids: list[int], n: int) -> dict:
        return _batch1(lambda: _timed_stream(self._stream(text, n)))

    def concurrent(self, texts: list[str], ids: list[list[int]], n: int) -> dict:
        return _concurrent(lambda t: _timed_stream(self._stream(t, n)), texts)

    def stop(self) -> None:
        self.server.stop()


class OfflinePeer:
    """bench/peer_workers.py in the peer's own Python, spoken to over stdin/stdout JSON lines."""

    def __init__(self, name: str, how: str, cmd: list[str], env: dict[str, str]) -> None:
        self.name, self.how, self.cmd, self.env = name, how, cmd, env
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def start(self, timeout: float) -> None:
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     stderr=subprocess.DEVNULL, env=self.env)
        line = self._readline(timeout)
        if line.strip() != "ready":
            raise PeerError(f"worker did not start (said {line.strip()[:200]!r}, exit {self.proc.poll()})")

    def _readline(self, timeout: float) -> str:
        box: list[str] = []
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not box:
            raise PeerError(f"no answer within {timeout:.0f}s")
        return box[0]

    def _ask(self, cmd: dict) -> dict:
        with self.lock:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
            line = self._readline(1800)
        if not line:
            raise PeerError(f"worker exited ({self.proc.poll()})")
        out = json.loads(line)
        if "error" in out:
            raise PeerError(out["error"])
        return out

    def batch1(self, text: str, ids: list[int], n: int) -> dict:
        return self._ask({"op": "batch1", "prompt": ids, "output_len": n})

    def concurrent(self, texts: list[str], ids: list[list[int]], n: int) -> dict:
        return self._ask({"op": "concurrent", "prompts": ids, "output_len": n})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
