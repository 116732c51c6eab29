"""Run a benchmark worker against any checkout of this repo, for side-by-side before/after runs.

The server's import packages are `tokenrelay_server` (folder `server/`) and `tokenrelay_engines`
(folder `engines/`), mapped by the editable install of ONE tree. To import another tree (say an
unpacked `git archive` of main), `tree_env(tree)` builds a folder of two symlinks named after the
packages and puts it (and the tree's client) first on PYTHONPATH; path entries are searched before
the editable finder, so the subprocess imports that tree.

    git archive main | tar -x -C /tmp/before
    python bench/step_host.py --tree before=/tmp/before --tree after=.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tree_env(tree: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment whose Python imports tokenrelay_server / tokenrelay_engines / tokenrelay from `tree`."""
    tree = Path(tree).resolve()
    shim = Path(tempfile.gettempdir()) / ("tokenrelay-tree-" + hashlib.sha1(str(tree).encode()).hexdigest()[:12])
    shim.mkdir(exist_ok=True)
    for name, folder in (("tokenrelay_server", "server"), ("tokenrelay_engines", "engines")):
        link = shim / name
        if not link.is_symlink() or Path(os.readlink(link)) != tree / folder:
            if link.is_symlink():
                link.unlink()
            link.symlink_to(tree / folder, target_is_directory=True)
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join([str(shim), str(tree / "client")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def parse_trees(specs: list[str] | None) -> list[tuple[str, Path]]:
    """`--tree name=path` values (default: this checkout as 'this')."""
    if not specs:
        return [("this", ROOT)]
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name or "tree", spec
        if not (Path(path) / "engines").is_dir():
            raise SystemExit(f"--tree {spec}: {path} is not a tokenrelay checkout")
        out.append((name, Path(path).resolve()))
    return out
