"""The `tokenrelay` command: call a tokenrelay server, or load-test one.

    tokenrelay generate "Hello" --max-tokens 16
    tokenrelay stream "Hello" --max-tokens 64
    tokenrelay chat --system "You are terse."
    tokenrelay tokenize "Hello" | info | load | health --ready
    tokenrelay submit "Hello" --wait
    tokenrelay job list --state running
    tokenrelay bench --concurrency 1,4,16 --num-requests 64 --plot plots/

Client commands talk to --target (default: env TOKENRELAY_TARGET, else localhost:50051).
Errors print the gRPC status code, message and field violations on stderr; exit code 1 for a
failed call, 2 for bad usage, 0 otherwise.

Other installed distributions add commands through the `tokenrelay.commands` entry-point group:
each entry point is named after its command and points to a function that takes the
sub-parsers object, adds its parser and sets `handler` (tokenrelay-server adds `serve`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

from tokenrelay.cli import _jobs, _text
from tokenrelay.cli._args import connection_parent
from tokenrelay.cli._output import report_error
from tokenrelay.errors import TokenRelayError

COMMANDS_GROUP = "tokenrelay.commands"
EXIT_RPC_ERROR = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]
AddCommand = Callable[[Any], None]  # takes argparse's sub-parsers object


def cmd_bench(args: argparse.Namespace) -> int:
    from tokenrelay import loadgen

    loadgen.run_bench(loadgen.config_from_args(args))
    return 0


def _plugin_failed(name: str, error: Exception) -> Handler:
    def handler(args: argparse.Namespace) -> int:
        print(f"error: the `{name}` command could not be loaded: {type(error).__name__}: {error}",
              file=sys.stderr)
        return EXIT_USAGE
    return handler


def _add_plugins(commands: Any, extra: Sequence[tuple[str, AddCommand]]) -> None:
    """Commands from other distributions (`serve` from tokenrelay-server), each added once;
    a name the client already has is skipped."""
    seen: set[str] = set()
    for name, add_command in extra:
        if name not in commands.choices:
            add_command(commands)
        seen.add(name)
    for point in sorted(entry_points(group=COMMANDS_GROUP), key=lambda p: p.name):
        if point.name in seen or point.name in commands.choices:
            continue
        seen.add(point.name)
        try:
            point.load()(commands)
        except Exception as error:  # a broken plugin must not take the client commands down
            broken = commands.add_parser(point.name, help=f"(failed to load from {point.value})")
            broken.set_defaults(handler=_plugin_failed(point.name, error))


def build_parser(extra: Sequence[tuple[str, AddCommand]] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenrelay", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `tokenrelay COMMAND --help` for each command's options.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    connection = connection_parent()

    def add(name: str, handler: Handler, summary: str, description: str = "",
            client: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=description or summary,
                                  parents=[connection] if client else [])
        sub.set_defaults(handler=handler)
        return sub

    _text.register(add)
    _jobs.register(add, connection)
    sub = add("bench", cmd_bench, "load-test a server (closed loop, Poisson or bursty arrivals)",
              "Load generator over GenerateStream: closed-loop concurrency sweeps or open-loop "
              "arrivals (Poisson, or gamma with --burstiness); reports TTFT, ITL, TPOT and E2E "
              "(mean, std, chosen percentiles), request / output / total token throughput and "
              "goodput; --plot DIR draws them (pip install 'tokenrelay-client[plot]').",
              client=False)
    from tokenrelay._bench_config import add_bench_arguments
    add_bench_arguments(sub)
    _add_plugins(commands, extra)  # after the client's own: a plugin cannot shadow them
    return parser


def main(argv: Sequence[str] | None = None, *, extra: Sequence[tuple[str, AddCommand]] = ()) -> int:
    """Run one command. `extra` adds (name, add_command) pairs before the entry-point plugins,
    for a caller that is itself the plugin (`python -m tokenrelay_server.cli`)."""
    args = build_parser(extra).parse_args(argv)
    try:
        code: int = args.handler(args)
        return code
    except TokenRelayError as error:
        report_error(error)
        return EXIT_RPC_ERROR
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
