"""Every `serve` flag reads TOKENRELAY_<FLAG>: one rule, walked over every flag the parser has."""

from __future__ import annotations

import argparse
import base64

import pytest

from tokenrelay_server import main as server_main

_CANDIDATES = ("7", "0.5", "2.5,5", "example.org", "sqlite:///tmp/tokenrelay-env.db",
               "whsec_" + base64.b64encode(b"k" * 32).decode())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    server_main.add_serve_arguments(parser)
    return parser


def _cli_value(flag: str, raw: str) -> object:
    parser = _parser()
    try:
        return getattr(parser.parse_args([flag, raw]), parser._option_string_actions[flag].dest)
    except (argparse.ArgumentError, SystemExit):
        return _INVALID


_INVALID = object()


def _raw_for(action: argparse.Action) -> tuple[str, list[str]]:
    """An env string that differs from the default, and the CLI arguments that mean the same."""
    flag = next(o for o in action.option_strings if o.startswith("--"))
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction)):
        want = not action.default
        if isinstance(action, argparse._StoreTrueAction):
            return "true", [flag]
        return ("true" if want else "false"), [flag if want else "--no-" + flag[2:]]
    if action.choices:
        choice = next(c for c in action.choices if c != action.default)
        return str(choice), [flag, str(choice)]
    for raw in _CANDIDATES:
        value = _cli_value(flag, raw)
        if value is not _INVALID and value != action.default and value != [action.default]:
            return raw, [flag, raw]
    raise AssertionError(f"no sample value for {flag}")


def test_every_serve_flag_reads_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = server_main.serve_flags(_parser())
    assert len(flags) >= 40  # the engine, admission, server, jobs and webhook flags all counted
    for action in flags:
        raw, cli = _raw_for(action)
        name = server_main.env_name(action)
        monkeypatch.setenv(name, raw)
        from_env = getattr(_parser().parse_args([]), action.dest)
        monkeypatch.delenv(name)
        from_cli = getattr(_parser().parse_args(cli), action.dest)
        assert from_env == from_cli, f"{name}={raw!r} gave {from_env!r}, {' '.join(cli)} gives {from_cli!r}"
        assert from_env != action.default, name


def test_a_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENRELAY_MAX_NUM_SEQS", "many")
    with pytest.raises(SystemExit, match="TOKENRELAY_MAX_NUM_SEQS"):
        _parser()
    monkeypatch.setenv("TOKENRELAY_MAX_NUM_SEQS", "8")
    monkeypatch.setenv("TOKENRELAY_WARMUP", "perhaps")
    with pytest.raises(SystemExit, match="TOKENRELAY_WARMUP"):
        _parser()
