"""`tokenrelay serve` as a real process with TLS, API keys, JSON logs, the health port and
metrics; the CLI (and `tokenrelay bench`) connecting with a CA, a server name and a key;
SIGHUP reloads the API keys and the certificates."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
from pathlib import Path

from tokenrelay_server.auth import key_digest
from tests.integration.certs import make_ca, make_server_cert
from tests.integration.test_cli import BOUND, ROOT, run_cli

ALICE_KEY = "tr-alice-subprocess-key"
CAROL_KEY = "tr-carol-added-later"


async def _wait_for(lines: list[dict], predicate, what: str) -> dict:
    """The first line matching `predicate` (fails the test after BOUND seconds)."""
    async with asyncio.timeout(BOUND):
        while True:
            for line in lines:
                if predicate(line):
                    return line
            await asyncio.sleep(0.02)  # polling a list filled by the reader task, bounded above


async def test_secure_server_process(tmp_path: Path) -> None:
    ca = make_ca()
    cert, key = make_server_cert(ca, "tokenrelay.test").write(tmp_path, "server")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.cert_pem)
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": {key_digest(ALICE_KEY): "alice"}}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenrelay_server.cli", "serve", "--engine", "synthetic", "--host", "127.0.0.1",
        "--port", "0", "--synthetic-ttft-ms", "1", "--synthetic-itl-ms", "1", "--drain-grace-seconds", "1",
        "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--api-keys-file", str(keys),
        "--health-port", "0", "--metrics-port", "0", "--log-format", "json",
        "--jobs-store", f"sqlite://{tmp_path}/jobs.db",
        cwd=ROOT, env={**os.environ, "TOKENRELAY_API_KEY": ""},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    logs: list[dict] = []
    raw: list[str] = []

    async def read_stderr() -> None:
        while line := await proc.stderr.readline():
            text = line.decode()
            raw.append(text)
            logs.append(json.loads(text))  # every line must be one JSON object

    reader = asyncio.create_task(read_stderr())
    try:
        address = None
        async with asyncio.timeout(BOUND):
            while address is None:
                line = (await proc.stdout.readline()).decode()
                assert line, f"server exited before listening: {raw}"
                if line.startswith("tokenrelay listening on "):
                    address = line.split()[-1]
        target = f"127.0.0.1:{address.rsplit(':', 1)[1]}"
        health = await _wait_for(logs, lambda r: "health-only port" in r["message"], "health port line")
        health_port = health["message"].rsplit(":", 1)[1]
        metrics = await _wait_for(logs, lambda r: "Prometheus metrics" in r["message"], "metrics line")
        metrics_url = metrics["message"].split()[-1]
        tls = ["--target", target, "--ca-cert", str(ca_file), "--server-name", "tokenrelay.test"]

        code, out, err = await run_cli("generate", "hi", "--max-tokens", "3", "--request-id", "req-cli-1",
                                       "--api-key", ALICE_KEY, *tls)
        assert code == 0 and out.strip(), err
        code, _, err = await run_cli("generate", "hi", "--max-tokens", "3", *tls)
        assert code == 1 and "UNAUTHENTICATED" in err
        code, out, err = await run_cli("submit", "job", "--max-tokens", "2", "--wait", *tls,
                                       env={"TOKENRELAY_API_KEY": ALICE_KEY})
        assert code == 0, err
        code, out, err = await run_cli("health", "--target", f"127.0.0.1:{health_port}")
        assert code == 0 and out.strip() == "SERVING", err
        code, out, err = await run_cli("bench", "--concurrency", "2", "--num-requests", "4", "--input-len", "8",
                                       "--output-len", "4", "--no-progress", "--api-key", ALICE_KEY, *tls)
        assert code == 0, err

        # The access line of the generate call: JSON, with the request id and the tenant.
        access = await _wait_for(logs, lambda r: r.get("request_id") == "req-cli-1" and "status" in r,
                                 "access line")
        assert access["logger"] == "tokenrelay.access" and access["status"] == "OK"
        assert access["method"] == "/tokenrelay.v1.TextGenerationService/Generate"
        assert access["tenant"] == "alice" and access["completion_tokens"] == 3 and access["duration_ms"] > 0
        assert any(r.get("status") == "UNAUTHENTICATED" for r in logs)
        assert ALICE_KEY not in "".join(raw)
        with urllib.request.urlopen(metrics_url, timeout=10) as reply:
            assert b"tokenrelay:request_success_total" in reply.read()

        # SIGHUP: a key added to the file is accepted; the certificates are re-read.
        keys.write_text(json.dumps({"keys": {key_digest(ALICE_KEY): "alice", key_digest(CAROL_KEY): "carol"}}))
        proc.send_signal(signal.SIGHUP)
        await _wait_for(logs, lambda r: "API keys reloaded" in r["message"], "keys reloaded")
        code, out, err = await run_cli("info", "--api-key", CAROL_KEY, *tls)
        assert code == 0 and json.loads(out)["engine"] == "synthetic", err
        await _wait_for(logs, lambda r: "TLS certificates reloaded" in r["message"], "certificates reloaded")

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), BOUND) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await asyncio.wait_for(reader, BOUND)
