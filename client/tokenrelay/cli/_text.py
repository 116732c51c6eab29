"""Commands over TextGenerationService and health: generate, stream, chat, tokenize,
detokenize, info, load, health."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc

from tokenrelay import Client
from tokenrelay.cli._args import (
    add_generation_options,
    add_prompt,
    client_keywords,
    generation_options,
    int_list,
    prompt_from_args,
)
from tokenrelay.cli._output import enum_name, jsonable, print_json
from tokenrelay.v1 import generation_pb2

READINESS_SERVICE = "tokenrelay.v1.TextGenerationService"


def open_client(args: argparse.Namespace) -> Client:
    return Client(args.target, **client_keywords(args))


def cmd_generate(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        result = client.generate(prompt_from_args(args), **generation_options(args))
    if args.json:
        print_json(result)
    else:
        print(result.text)
    return 0


def _event(kind: str, value: Any) -> None:
    print(json.dumps({kind: jsonable(value)}), flush=True)


def cmd_stream(args: argparse.Namespace) -> int:
    with open_client(args) as client, client.stream(prompt_from_args(args), **generation_options(args)) as stream:
        started_shown = False
        for delta in stream:
            if args.json:
                if not started_shown and stream.started is not None:
                    _event("started", stream.started)
                    started_shown = True
                _event("delta", delta)
            else:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        if args.json:
            if not started_shown and stream.started is not None:
                _event("started", stream.started)
            _event("finished", getattr(stream, "finished", None) or {
                "finish_reason": enum_name(stream.finish_reason, generation_pb2.FinishReason, "FINISH_REASON_"),
                "usage": jsonable(stream.usage)})
        else:
            sys.stdout.write("\n")
            reason = stream.finish_reason
            if reason is not None and args.verbose:
                usage = stream.usage
                print(f"[{enum_name(reason, generation_pb2.FinishReason, 'FINISH_REASON_')}: "
                      f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens]",
                      file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tokenrelay.cli._chat import chat_loop

    with open_client(args) as client:
        return chat_loop(client, generation_options(args), system=args.system)


def cmd_tokenize(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    with open_client(args) as client:
        print(json.dumps(jsonable(client.tokenize(text, add_special_tokens=args.add_special_tokens))))
    return 0


def cmd_detokenize(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        print(client.detokenize(args.token_ids, skip_special_tokens=args.skip_special_tokens))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        print_json(client.info())
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        print_json(client.load())
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """grpc.health.v1 Check through the client's channel (so TLS and API keys apply)."""
    from tokenrelay.cli._health import check
    from tokenrelay.errors import from_rpc_error

    service = READINESS_SERVICE if args.ready else args.service
    with open_client(args) as client:
        try:
            status = check(client.channel, service, timeout=args.timeout or 5.0,
                           metadata=args.metadata or None)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if error.code == grpc.StatusCode.NOT_FOUND and not error.message:
                error.message = f"unknown service {service!r}"
            raise error from None
    print(status)
    return 0 if status == "SERVING" else 1


def register(add: Any) -> None:
    """Add this module's commands through `add(name, handler, summary, description)`."""
    for name, handler, summary in (
        ("generate", cmd_generate, "generate a whole answer (unary Generate)"),
        ("stream", cmd_stream, "print tokens as they are produced (GenerateStream)"),
    ):
        sub = add(name, handler, summary)
        add_prompt(sub)
        add_generation_options(sub)
        sub.add_argument("--json", action="store_true", help="print JSON instead of text")
        if name == "stream":
            sub.add_argument("-v", "--verbose", action="store_true",
                             help="print finish reason and token usage on stderr")

    sub = add("chat", cmd_chat, "chat in the terminal; replies stream as they are generated",
              "An interactive chat: each line is a user message, the reply streams token by token "
              "(GenerateStream with chat messages, rendered by the model's chat template), and the "
              "conversation is kept. /reset starts over; /exit or Ctrl-D quits; Ctrl-C stops a reply.")
    add_generation_options(sub)
    sub.add_argument("--system", default=None, help="a system message that opens the conversation")

    sub = add("tokenize", cmd_tokenize, "print the token ids of a text, as JSON")
    sub.add_argument("text", help="text to tokenize; '-' reads stdin")
    sub.add_argument("--add-special-tokens", action="store_true", help="add BOS etc. as for a prompt")
    sub = add("detokenize", cmd_detokenize, "print the text of token ids")
    sub.add_argument("token_ids", type=int_list, help="token ids, e.g. 1,15,27")
    sub.add_argument("--skip-special-tokens", action="store_true", help="drop special tokens")
    add("info", cmd_info, "print the served model's info (GetModelInfo) as JSON")
    add("load", cmd_load, "print the server's load (GetServerLoad) as JSON")

    sub = add("health", cmd_health, "gRPC health check; exit 0 only when SERVING",
              "Query grpc.health.v1.Health/Check and print the status; exit 0 only when SERVING "
              "(a container HEALTHCHECK). The empty service is liveness; --ready checks "
              f"{READINESS_SERVICE} (readiness: model loaded and warmed up, not draining).")
    choice = sub.add_mutually_exclusive_group()
    choice.add_argument("--service", default="", help="service name to check (default: '' = liveness)")
    choice.add_argument("--ready", action="store_true", help=f"check readiness ({READINESS_SERVICE})")
