"""argparse helpers shared by the `tokenrelay` CLI and the load generator's own CLI."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tokenrelay._params import GENERATION_OPTIONS


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.lower(), value


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_prompt(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=None,
                        help="prompt text; '-' reads it from stdin")
    parser.add_argument("--token-ids", type=int_list, default=None, metavar="IDS",
                        help="prompt as token ids instead of text, e.g. 1,15,27")


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation (unset: server defaults)")
    for flag, kind, text in (
        ("--max-tokens", int, "most tokens to generate (server default 16)"),
        ("--min-tokens", int, "fewest tokens before eos/stop may end the output"),
        ("--temperature", float, "0 is greedy (default 1.0)"),
        ("--top-p", float, "nucleus sampling mass in (0, 1]"),
        ("--top-k", int, "keep the k most likely tokens; 0 disables"),
        ("--min-p", float, "drop tokens below min_p x the top token's probability"),
        ("--repetition-penalty", float, "multiplicative penalty > 0 for seen tokens"),
        ("--presence-penalty", float, "additive penalty in [-2, 2] for tokens in the output"),
        ("--frequency-penalty", float, "additive penalty in [-2, 2] scaled by count"),
        ("--seed", int, "sampling seed (same seed, same tokens)"),
        ("--logprobs", int, "return logprobs with this many top alternatives"),
        ("--priority", int, "lower runs first, in [-100, 100]"),
    ):
        group.add_argument(flag, type=kind, default=None, help=text)
    group.add_argument("--stop", action="append", default=None, help="stop string, repeatable")
    group.add_argument("--stop-token-id", dest="stop_token_ids", action="append", type=int,
                       default=None, help="stop token id, repeatable")
    group.add_argument("--ignore-eos", action="store_true", help="keep generating past eos")
    group.add_argument("--include-stop-in-output", action="store_true",
                       help="keep the matched stop string/token in the output")
    group.add_argument("--request-id", default=None, help="client-chosen request id (echoed back)")


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, key) for key in sorted(GENERATION_OPTIONS) if getattr(args, key) is not None}


def prompt_from_args(args: argparse.Namespace) -> str | list[int]:
    if args.token_ids is not None:
        if args.prompt is not None:
            raise ValueError("give a prompt text or --token-ids, not both")
        return args.token_ids
    if args.prompt is None:
        raise ValueError("a prompt is required (text, '-' for stdin, or --token-ids)")
    return sys.stdin.read() if args.prompt == "-" else args.prompt
