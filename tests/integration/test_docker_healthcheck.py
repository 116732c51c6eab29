"""The image's HEALTHCHECK command, taken from the Dockerfile and run as it is (with this
environment's `tokenrelay`), against real servers: healthy only once the server is ready."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from pathlib import Path

from tokenrelay_engines.synthetic import SyntheticEngine, SyntheticEngineConfig

ROOT = Path(__file__).resolve().parents[2]


def healthcheck_commands() -> list[list[str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    return [json.loads(m) for m in re.findall(r"^HEALTHCHECK .*? CMD (\[.*\])$", text, re.MULTILINE)]


async def run(command: list[str], target: str) -> tuple[int, str]:
    script = Path(sys.executable).parent / command[0]
    proc = await asyncio.create_subprocess_exec(
        str(script), *command[1:], env={**os.environ, "TOKENRELAY_TARGET": target},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert b"Traceback" not in err
    return proc.returncode, out.decode().strip()


async def test_healthcheck_is_healthy_only_when_ready(synthetic_server_factory):
    commands = healthcheck_commands()
    assert len(commands) == 3 and all(c == commands[0] for c in commands)  # cpu, gpu, trtllm
    (command,) = commands[:1]
    gate = asyncio.Event()
    warming = await synthetic_server_factory(
        engine=SyntheticEngine(SyntheticEngineConfig(ttft_ms=1, itl_ms=1), start_gate=gate), wait_ready=False)
    # alive (liveness SERVING) but not ready: the HEALTHCHECK must say unhealthy
    liveness = [c for c in command if c != "--ready"]
    assert await run(liveness, warming.address) == (0, "SERVING")
    assert await run(command, warming.address) == (1, "NOT_SERVING")
    gate.set()
    await warming.handle.wait_ready(timeout=10)
    assert await run(command, warming.address) == (0, "SERVING")
