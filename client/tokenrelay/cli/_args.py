"""argparse pieces shared by the `tokenrelay` commands and the load generator's own CLI.

Each flag's destination is the client's keyword of the same name (`--max-tokens` ->
`max_tokens=`), and only the flags given reach the client, so the server's (and the
client's) defaults apply to everything left unset.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from tokenrelay._security import add_security_arguments, security_from_args

DEFAULT_TARGET = "localhost:50051"

# (flag, type, help); the destination is the flag without dashes, which is the client's keyword.
_VALUE_OPTIONS: tuple[tuple[str, type, str], ...] = (
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
)
GENERATION_KEYWORDS = tuple(flag[2:].replace("-", "_") for flag, _, _ in _VALUE_OPTIONS) + (
    "stop", "stop_token_ids", "ignore_eos", "include_stop_in_output", "request_id")


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


def connection_parent() -> argparse.ArgumentParser:
    """--target, --timeout, --retries, --metadata and the TLS / API-key flags, for every client command."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument("--target", default=os.environ.get("TOKENRELAY_TARGET") or DEFAULT_TARGET,
                       help=f"server host:port (default: env TOKENRELAY_TARGET, else {DEFAULT_TARGET})")
    group.add_argument("--timeout", type=float, default=None,
                       help="deadline for each call in seconds (default: the client's)")
    group.add_argument("--retries", type=int, default=None,
                       help="retries of calls that are safe to retry (default: the client's)")
    group.add_argument("--metadata", action="append", type=key_value, default=[],
                       metavar="KEY=VALUE", help="extra request metadata, repeatable "
                       "(e.g. x-request-id=abc)")
    add_security_arguments(group)
    return parent


def client_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for Client / AsyncClient from the connection flags; unset flags are left
    out so the client's own defaults (timeout, retries, environment) apply."""
    security = security_from_args(args)
    keywords: dict[str, Any] = {"metadata": args.metadata, "credentials": security.credentials(),
                                "options": security.options(), "api_key": security.api_key}
    if args.timeout is not None:
        keywords["timeout"] = args.timeout
    if args.retries is not None:
        keywords["max_retries"] = args.retries
    return {key: value for key, value in keywords.items() if value is not None}


def add_prompt(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", nargs="?", default=None,
                        help="prompt text; '-' reads it from stdin")
    parser.add_argument("--token-ids", type=int_list, default=None, metavar="IDS",
                        help="prompt as token ids instead of text, e.g. 1,15,27")


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation (unset: server defaults)")
    for flag, kind, text in _VALUE_OPTIONS:
        group.add_argument(flag, type=kind, default=None, help=text)
    group.add_argument("--stop", action="append", default=None, help="stop string, repeatable")
    group.add_argument("--stop-token-id", dest="stop_token_ids", action="append", type=int,
                       default=None, help="stop token id, repeatable")
    group.add_argument("--ignore-eos", action="store_true", default=None,
                       help="keep generating past eos")
    group.add_argument("--include-stop-in-output", action="store_true", default=None,
                       help="keep the matched stop string/token in the output")
    group.add_argument("--request-id", default=None, help="client-chosen request id (echoed back)")


def generation_options(args: argparse.Namespace) -> dict[str, Any]:
    """The generation flags that were given, as the client's keyword arguments."""
    return {key: getattr(args, key) for key in GENERATION_KEYWORDS if getattr(args, key) is not None}


def prompt_from_args(args: argparse.Namespace) -> str | list[int]:
    if args.token_ids is not None:
        if args.prompt is not None:
            raise ValueError("give a prompt text or --token-ids, not both")
        return list(args.token_ids)
    if args.prompt is None:
        raise ValueError("a prompt is required (text, '-' for stdin, or --token-ids)")
    return sys.stdin.read() if args.prompt == "-" else str(args.prompt)
