"""Time to the first token of the first request after `tokenrelay serve` starts (default model).

Each run starts a fresh server process (no model flag: SmolLM2-135M-Instruct), waits for its
`listening` line (printed once the model is loaded and warmed up), sends one chat message over
GenerateStream and times the first streamed token; a second request on the same server is timed
too, for comparison with a warm server. Prints the median of each over the runs.

    python bench/first_token.py --runs 3 [--serve-arg=--model=demo ...]
"""

from __future__ import annotations

import argparse
import selectors
import signal
import statistics
import subprocess
import sys
import time

from tokenrelay import Client

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def start(extra: list[str]) -> tuple[subprocess.Popen, str, float]:
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "tokenrelay_server.cli", "serve", "--host", "127.0.0.1", "--port", "0",
                             "--log-level", "WARNING", *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    seen = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while b"listening on" not in seen or not seen.endswith(b"\n"):
            if proc.poll() is not None or time.monotonic() - t0 > 600:
                raise RuntimeError(f"server did not start: {seen!r}")
            if sel.select(timeout=1.0):
                seen += proc.stdout.read1(4096)
    line = next(ln for ln in seen.decode().splitlines() if "listening on" in ln)
    return proc, line.rsplit(" ", 1)[1], time.monotonic() - t0


def first_token_seconds(client: Client, messages: list[dict[str, str]]) -> float:
    sent = time.monotonic()
    with client.chat_stream(messages, max_tokens=8, temperature=0) as stream:
        for delta in stream:
            if delta.token_ids:
                return time.monotonic() - sent
    raise RuntimeError("no token streamed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--serve-arg", action="append", default=[], help="extra `tokenrelay serve` argument")
    args = p.parse_args()
    ready, first, second = [], [], []
    for run in range(args.runs):
        proc, address, ready_s = start(args.serve_arg)
        try:
            with Client(address, timeout=120) as client:
                first.append(first_token_seconds(client, QUESTION))
                second.append(first_token_seconds(client, QUESTION))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        ready.append(ready_s)
        print(f"run {run}: ready {ready_s:.1f}s, first request TTFT {first[-1] * 1000:.0f} ms, "
              f"second {second[-1] * 1000:.0f} ms", flush=True)
    print(f"median over {args.runs}: ready {statistics.median(ready):.1f}s, first-request TTFT "
          f"{statistics.median(first) * 1000:.0f} ms, warm TTFT {statistics.median(second) * 1000:.0f} ms "
          f"(ratio {statistics.median(first) / statistics.median(second):.2f})")


if __name__ == "__main__":
    main()
