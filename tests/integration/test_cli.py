"""The `tokenrelay` CLI run as real subprocesses (`python -m tokenrelay_server.cli ...`: the client's command
with the server's `serve` added) against real servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from tokenrelay_server.cli import main

ROOT = Path(__file__).resolve().parents[2]
BOUND = 90.0  # seconds: every subprocess wait is bounded


async def run_cli(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None
                  ) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenrelay_server.cli", *args, cwd=ROOT, env={**os.environ, **(env or {})},
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), BOUND)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


SUBCOMMANDS = [["serve"], ["generate"], ["stream"], ["chat"], ["tokenize"], ["detokenize"], ["info"], ["load"],
               ["submit"], ["job"], ["job", "get"], ["job", "watch"], ["job", "wait"], ["job", "cancel"],
               ["job", "list"], ["job", "delete"], ["health"], ["bench"]]


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=lambda c: "-".join(c))
def test_help_for_each_subcommand(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tokenrelay {' '.join(command)}")
    if command != ["serve"]:
        assert "--target" in out


async def test_top_level_help_as_subprocess():
    code, out, err = await run_cli("--help")
    assert code == 0, err
    for command in ("serve", "generate", "stream", "tokenize", "submit", "job", "info", "health", "bench"):
        assert command in out


async def test_text_generation_commands(synthetic_server):
    target = synthetic_server.address
    results = await asyncio.gather(
        run_cli("generate", "hello relay", "--max-tokens", "6", "--seed", "5", "--target", target),
        run_cli("generate", "hello relay", "--max-tokens", "6", "--seed", "5", "--json", "--target", target),
        run_cli("stream", "hello relay", "--max-tokens", "6", "--seed", "5", "-v", env={"TOKENRELAY_TARGET": target}),
        run_cli("stream", "-", "--max-tokens", "3", "--json", "--target", target, stdin=b"from stdin"),
        run_cli("tokenize", "Hi", "--add-special-tokens", "--target", target),
        run_cli("detokenize", "76,109", "--target", target),
        run_cli("info", "--target", target),
        run_cli("load", "--target", target),
    )
    for code, _, err in results:
        assert code == 0, err
        assert "Traceback" not in err
    (_, text, _), (_, as_json, _), (_, streamed, stream_err), (_, stream_json, _) = results[:4]
    result = json.loads(as_json)
    assert len(result["token_ids"]) == 6 and result["finish_reason"] == "length"
    assert text == result["text"] + "\n"
    assert streamed == result["text"] + "\n"
    assert "[length: " in stream_err and "6 completion tokens" in stream_err  # str() of the reason: `length`
    events = [json.loads(line) for line in stream_json.splitlines()]
    assert list(events[0]) == ["started"] and list(events[-1]) == ["finished"]
    assert events[0]["started"]["prompt_tokens"] == len("from stdin") + 1
    assert sum(len(e["delta"]["token_ids"]) for e in events[1:-1]) == 3
    assert json.loads(results[4][1]) == [1, 4 + ord("H"), 4 + ord("i")]
    assert results[5][1] == "Hi\n"
    assert json.loads(results[6][1])["engine"] == "synthetic"
    assert "queue_capacity" in json.loads(results[7][1])


async def test_errors_print_status_and_field_violations(synthetic_server):
    target = synthetic_server.address
    (code, out, err), (usage_code, _, usage_err), (conflict_code, _, conflict_err) = await asyncio.gather(
        run_cli("generate", "hi", "--top-p", "3", "--max-tokens", "0", "--target", target),
        run_cli("generate", "--target", target),
        run_cli("generate", "hi", "--token-ids", "1,2", "--target", target),
    )
    assert code == 1 and out == ""
    assert err.startswith("error: INVALID_ARGUMENT:")
    assert "sampling.top_p" in err and "stopping.max_tokens" in err
    assert "Traceback" not in err
    assert usage_code == 2 and "prompt is required" in usage_err and "Traceback" not in usage_err
    assert conflict_code == 2 and "not both" in conflict_err


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_health(synthetic_server):
    target = synthetic_server.address
    (ok, ok_out, _), (ready, ready_out, _), (unknown, _, unknown_err), (down, _, down_err) = await asyncio.gather(
        run_cli("health", "--target", target),
        run_cli("health", "--service", "tokenrelay.v1.TextGenerationService", "--target", target),
        run_cli("health", "--service", "no.such.Service", "--target", target),
        run_cli("health", "--target", f"127.0.0.1:{_closed_port()}", "--timeout", "2", "--retries", "0"),
    )
    assert ok == 0 and ok_out.strip() == "SERVING"
    assert ready == 0 and ready_out.strip() == "SERVING"
    assert unknown == 1 and "NOT_FOUND" in unknown_err
    assert down == 1 and ("UNAVAILABLE" in down_err or "DEADLINE_EXCEEDED" in down_err)
    assert "Traceback" not in unknown_err + down_err


async def test_job_commands(synthetic_server):
    target = synthetic_server.address
    code, out, err = await run_cli("submit", "hello relay", "--max-tokens", "4", "--target", target)
    assert "Traceback" not in err
    if code == 1 and "UNIMPLEMENTED" in err:
        # The Jobs service is not wired in this build: the error is clean; the rest would match.
        code, _, err = await run_cli("job", "list", "--target", target)
        assert code == 1 and err.startswith("error: UNIMPLEMENTED") and "Traceback" not in err
        pytest.skip("the server's Jobs service is not wired yet")
    assert code == 0, err
    job_id = out.strip()
    code, out, err = await run_cli("job", "wait", job_id, "--wait-timeout", "60", "--target", target)
    assert code == 0, err
    assert json.loads(out)["state"] == "succeeded"
    (get_code, get_out, _), (list_code, list_out, _), (watch_code, _, watch_err) = await asyncio.gather(
        run_cli("job", "get", job_id, "--target", target),
        run_cli("job", "list", "--target", target),
        run_cli("job", "watch", job_id, "--target", target),
    )
    assert get_code == 0 and json.loads(get_out)["job_id"] == job_id
    assert list_code == 0 and job_id in list_out
    assert watch_code == 0 and "[ended succeeded]" in watch_err
    code, _, err = await run_cli("job", "delete", job_id, "--target", target)
    assert code == 0, err
    code, _, err = await run_cli("job", "get", job_id, "--target", target)
    assert code == 1 and "NOT_FOUND" in err


async def test_serve_then_health_then_sigterm():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenrelay_server.cli", "serve", "--engine", "synthetic", "--host", "127.0.0.1",
        "--port", "0", "--synthetic-ttft-ms", "1", "--synthetic-itl-ms", "1", "--drain-grace-seconds", "1",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        address = None
        async with asyncio.timeout(BOUND):
            while address is None:
                line = (await proc.stdout.readline()).decode()
                assert line, "server exited before listening"
                if line.startswith("tokenrelay listening on "):
                    address = line.split()[-1]
        port = address.rsplit(":", 1)[1]
        code, out, err = await run_cli("health", "--target", f"127.0.0.1:{port}")
        assert code == 0 and out.strip() == "SERVING", err
        code, out, err = await run_cli("generate", "x", "--max-tokens", "2", "--target", f"127.0.0.1:{port}")
        assert code == 0 and out.strip(), err
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), BOUND) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
