"""The client distribution on its own: a fresh virtualenv with only `pip install ./client`
(grpcio + protobuf; no torch, no tokenrelay-server) has the `tokenrelay` command, and it
generates against a real server started from the main environment."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokenrelay import AsyncClient

ROOT = Path(__file__).resolve().parents[2]
INSTALL_BOUND = 600.0  # seconds: building and installing the client wheel (cached downloads)
BOUND = 90.0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client_only_venv(tmp_path_factory) -> Path:
    """A virtualenv without system site-packages holding only tokenrelay-client and its deps.
    The client is copied first so the build leaves nothing in the checkout."""
    base = tmp_path_factory.mktemp("client-only")
    source = base / "client"
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=INSTALL_BOUND)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    str(source)], check=True, timeout=INSTALL_BOUND, env=env)
    return venv


async def run(venv: Path, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = await asyncio.create_subprocess_exec(
        str(venv / "bin" / args[0]), *args[1:], env=env, cwd=venv.parent,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), BOUND)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(), err.decode()


async def test_client_only_venv_runs_tokenrelay_generate(client_only_venv, synthetic_server, tmp_path):
    venv, target = client_only_venv, synthetic_server.address
    code, out, err = await run(venv, "python", "-c", "import importlib.util as u; print(json.dumps("
                               "[u.find_spec(m) is not None for m in ('torch', 'tokenrelay_server', "
                               "'tokenrelay_engines', 'grpc_health', 'tokenrelay')]))".replace(
                                   "print(", "import json; print(", 1))
    assert code == 0, err
    assert json.loads(out) == [False, False, False, False, True]  # only the client is there

    async with AsyncClient(target) as client:
        expected = await client.generate("hello relay", max_tokens=5, seed=3)
    (gen_code, gen_out, gen_err), (help_code, help_out, _), (serve_code, _, serve_err), \
        (health_code, health_out, health_err), (info_code, info_out, info_err) = await asyncio.gather(
            run(venv, "tokenrelay", "generate", "hello relay", "--max-tokens", "5", "--seed", "3", "--target", target),
            run(venv, "tokenrelay", "--help"),
            run(venv, "tokenrelay", "serve"),
            run(venv, "tokenrelay", "health", "--ready", "--target", target),
            run(venv, "tokenrelay", "info", "--target", target))
    assert gen_code == 0, gen_err
    assert gen_out == expected.text + "\n" and expected.text
    assert help_code == 0
    listed = {line.split()[0] for line in help_out.splitlines() if line.startswith("    ") and line.strip()}
    assert {"generate", "stream", "chat", "tokenize", "info", "load", "health", "submit", "job", "bench"} <= listed
    assert "serve" not in listed  # the server distribution is what adds it
    assert serve_code == 2 and "invalid choice: 'serve'" in serve_err
    assert health_code == 0 and health_out.strip() == "SERVING", health_err
    assert info_code == 0 and json.loads(info_out)["engine"] == "synthetic", info_err

    # --plot without the [plot] extra fails at once with the install hint, before any load
    code, out, err = await run(venv, "tokenrelay", "bench", "--target", target, "--num-requests", "1",
                               "--plot", str(tmp_path / "plots"))
    assert code == 2 and "tokenrelay-client[plot]" in err and "Traceback" not in err
    assert not (tmp_path / "plots").exists()
