"""Which torch engine mode the tests' in-process servers use: TOKENRELAY_ENGINE_PROCESS, read the
way `serve` reads it (apply_env_defaults), so one variable switches subprocess and in-process
servers alike. CI runs the torch-engine integration tests once more with the other mode."""

from __future__ import annotations

import argparse

from tokenrelay_server.main import add_serve_arguments


def engine_process() -> bool:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args([]).engine_process == "on"
