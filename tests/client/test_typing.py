"""`mypy --strict` on code that uses the public client API: clean, and a misspelled option or a
wrong type is an error (the options are typed keyword parameters, not **kwargs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tokenrelay

HERE = Path(__file__).resolve().parent
# mypy does not follow setuptools' editable-install finders: point it at the package's folder.
CLIENT_ROOT = Path(tokenrelay.__file__).resolve().parent.parent
CONFIG = """\
[mypy]
strict = True
python_version = 3.10
cache_dir = {cache}
# The generated *_pb2_grpc.py stubs are untyped (the *_pb2.pyi ones are typed).
[mypy-tokenrelay.v1.*]
ignore_errors = True
"""


def _mypy(tmp_path: Path, *files: Path) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "mypy.ini"
    config.write_text(CONFIG.format(cache=tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(config), *map(str, files)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={"MYPYPATH": str(CLIENT_ROOT), "PATH": "/usr/bin:/bin"})


def test_the_public_api_is_strictly_typed(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from tokenrelay import Client\n"
        "with Client() as client:\n"
        "    client.generate('hi', temprature=0.5)\n"  # misspelled option
        "    client.generate('hi', max_tokens='8')\n"  # wrong type
        "    n: int = client.generate('hi').finish_reason.value\n"
        "    s: str = client.generate('hi').usage\n")  # Usage is not a str
    done = _mypy(tmp_path, HERE / "example_typed.py", bad)
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert all(line.startswith(str(bad)) or line.startswith("bad.py") for line in errors), done.stdout
    assert len(errors) == 3, done.stdout + done.stderr
    assert 'Unexpected keyword argument "temprature"' in done.stdout
    assert '"max_tokens"' in done.stdout and "Usage" in done.stdout
