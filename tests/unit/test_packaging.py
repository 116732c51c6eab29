"""The server distribution's import packages are prefixed (`tokenrelay_server`, `tokenrelay_engines`)
so they cannot collide with other projects' `server` / `engines`; the repo keeps its folders."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[2]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_folder_package_is_listed_under_its_prefixed_name():
    setuptools = _project()["tool"]["setuptools"]
    package_dir = setuptools["package-dir"]
    assert package_dir == {"tokenrelay_server": "server", "tokenrelay_engines": "engines"}
    on_disk = set()
    for name, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join((name, *rel.parts)))
    assert on_disk == set(setuptools["packages"])


def test_no_unprefixed_imports_remain():
    offenders = []
    for folder in ("server", "engines", "tests", "bench", "scripts"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                stripped = line.strip()
                if stripped.startswith(("from server", "import server", "from engines", "import engines")):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {stripped}")
    assert not offenders, offenders


def test_imports_resolve_to_this_checkout():
    import tokenrelay_engines
    import tokenrelay_server

    assert Path(tokenrelay_server.__file__).resolve().parent == ROOT / "server"
    assert Path(tokenrelay_engines.__file__).resolve().parent == ROOT / "engines"


def test_the_server_pins_the_client_of_this_checkout():
    """No registry has tokenrelay-client: the server asks for exactly the version in ./client, which
    resolves when both are installed in one pip command (README, scripts/serve.sh, .ci/run, Docker)."""
    server = _project()["project"]["dependencies"]
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    assert f"tokenrelay-client=={client['version']}" in server
