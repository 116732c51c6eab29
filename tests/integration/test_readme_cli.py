"""The README's CLI block (the ```sh block of "The CLI"), run verbatim by bash against a real
server serving the demo model (`tokenrelay serve --model demo` on an ephemeral port, named by
TOKENRELAY_TARGET as the README says); every `# -> TEXT` comment is text the output must hold."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOUND = 120.0  # seconds, for the server to listen and for the whole block

pytestmark = pytest.mark.slow


def readme_shell_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.findall(r"^```sh\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


@pytest.fixture
def demo_server(tmp_path) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay_server.cli", "serve", "--model", "demo", "--host", "127.0.0.1",
         "--port", "0", "--jobs-store", f"sqlite://{tmp_path}/jobs.sqlite", "--drain-grace-seconds", "1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the server prints its address once it listens (bounded by pytest-timeout)
        assert line.startswith("tokenrelay listening on "), line
        yield line.split()[-1]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_readme_cli_block_runs_verbatim(demo_server, tmp_path):
    (block,) = readme_shell_blocks()
    expected = [m.strip() for m in re.findall(r"# -> (.*)$", block, re.MULTILINE)]
    assert len(expected) >= 8
    bin_dir = str(Path(sys.executable).parent)  # this environment's `tokenrelay`
    env = {**os.environ, "TOKENRELAY_TARGET": demo_server, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=BOUND)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    for text in expected:
        assert text in done.stdout, f"{text!r} not in the output:\n{done.stdout[-3000:]}"
    assert "[eos: " in done.stderr  # stream -v: the finish reason, readable
    plots = sorted(p.name for p in (tmp_path / "bench-plots").glob("*.png"))
    assert plots == ["latency_distributions.png", "latency_vs_concurrency.png", "throughput_vs_concurrency.png"]
    assert (tmp_path / "bench.json").stat().st_size > 0
