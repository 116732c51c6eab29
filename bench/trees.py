"""Run a server from any source tree, for before/after benchmarks.

Since the rename, the server imports as `tokenrelay_server` through its editable install, so a
tree cannot be picked by PYTHONPATH alone. `tree_python(tree)` is this interpreter for this
checkout, and for any other tree a cached virtualenv that sees this Python's packages and has
that tree (and its client) installed editable, without dependencies. `server_module(tree, name)`
is the module to run with `-m` there: `tokenrelay_server.<name>`, or `server.<name>` for trees
from before the rename.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tree_python(tree: Path) -> str:
    tree = tree.resolve()
    if tree == ROOT:
        return sys.executable
    venv = Path(tempfile.gettempdir()) / "tokenrelay-trees" / hashlib.sha1(str(tree).encode()).hexdigest()[:12]
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(tree),
                        "-e", str(tree / "client")], check=True)
    return str(python)


def server_module(tree: Path, name: str) -> str:
    renamed = "tokenrelay_server" in (tree / "pyproject.toml").read_text()
    return f"{'tokenrelay_server' if renamed else 'server'}.{name}"
