"""One `tokenrelay` command across two distributions: the client owns the console script, the
server adds `serve` through the `tokenrelay.commands` entry-point group."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tokenrelay.cli import COMMANDS_GROUP, build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def _commands(parser) -> set[str]:
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    return set(sub.choices)


def test_only_the_client_claims_the_console_script():
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())["project"]
    assert client["scripts"] == {"tokenrelay": "tokenrelay.cli:main"}
    assert "tokenrelay" not in server.get("scripts", {})
    assert server["entry-points"][COMMANDS_GROUP] == {"serve": "tokenrelay_server.cli:add_serve_command"}
    assert "matplotlib>=3.7" in client["optional-dependencies"]["plot"]
    assert not any(dep.split(">")[0].split("=")[0].strip() in ("torch", "matplotlib", "tokenrelay-server")
                   for dep in client["dependencies"])


def test_serve_is_discovered_from_the_installed_server():
    commands = _commands(build_parser())
    assert {"serve", "generate", "stream", "chat", "tokenize", "detokenize", "info", "load", "health",
            "submit", "job", "bench"} <= commands


def test_the_console_script_has_serve():
    script = Path(sys.executable).parent / "tokenrelay"
    done = subprocess.run([str(script), "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: tokenrelay serve") and "--engine" in done.stdout


@pytest.fixture
def plugin_dist(tmp_path, monkeypatch):
    """A real installed distribution (a .dist-info on sys.path) declaring two commands: one
    that fails to import and one that tries to shadow a client command."""
    info = tmp_path / "tokenrelay_fake_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tokenrelay-fake-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[{COMMANDS_GROUP}]\nbroken = tokenrelay_no_such_module:add\ngenerate = tokenrelay_no_such_module:add\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return info


def test_a_broken_plugin_gets_a_clear_error_and_the_rest_still_works(plugin_dist, capsys):
    parser = build_parser()
    assert {"broken", "generate", "serve"} <= _commands(parser)
    assert main(["broken"]) == 2
    err = capsys.readouterr().err
    assert "the `broken` command could not be loaded" in err and "tokenrelay_no_such_module" in err
    with pytest.raises(SystemExit) as done:  # `generate` is still the client's own command
        main(["generate", "--help"])
    assert done.value.code == 0
    assert "--max-tokens" in capsys.readouterr().out
