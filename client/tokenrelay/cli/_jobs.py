"""Commands over JobsService: submit, and job get|watch|wait|cancel|list|delete."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tokenrelay.cli._args import add_generation_options, add_prompt, generation_options, key_value, prompt_from_args
from tokenrelay.cli._output import enum_name, print_json
from tokenrelay.cli._text import open_client
from tokenrelay.v1 import jobs_pb2


def _state(value: Any) -> str:
    return enum_name(value, jobs_pb2.JobState, "JOB_STATE_")


def cmd_submit(args: argparse.Namespace) -> int:
    options: dict[str, Any] = {key: value for key, value in (
        ("job_priority", args.job_priority), ("idempotency_key", args.idempotency_key),
        ("queue_ttl", args.queue_ttl), ("max_attempts", args.max_attempts),
        ("webhook_url", args.webhook_url)) if value is not None}
    if args.label:
        options["labels"] = dict(args.label)
    with open_client(args) as client:
        job = client.submit(prompt_from_args(args), **options, **generation_options(args)).job
        if args.wait:
            job = client.wait(job.job_id, timeout=args.wait_timeout)
    if args.json:
        print_json(job)
    elif args.wait:
        print(job.result.text)
        print(f"{job.job_id} {_state(job.state)}", file=sys.stderr)
    else:
        print(job.job_id)
    return 0


def _job_line(job: Any) -> str:
    return f"{job.job_id}\t{_state(job.state)}\t{job.completion_tokens}/{job.max_tokens} tokens"


def _watch(client: Any, args: argparse.Namespace) -> None:
    for event in client.watch(args.job_id, args.from_offset):
        if args.json:
            print_json(event, indent=None)
            continue
        # protobuf events name their oneof; typed events carry the same attribute names
        kind = event.WhichOneof("event") if hasattr(event, "WhichOneof") else getattr(event, "kind", None)
        if kind == "delta":
            sys.stdout.write(event.delta.text)
            sys.stdout.flush()
        elif kind == "state_change":
            print(f"[{_state(event.state_change.state)}]", file=sys.stderr)
        elif kind == "ended":
            sys.stdout.write("\n")
            print(f"[ended {_state(event.ended.state)}]", file=sys.stderr)


def cmd_job(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        action = args.job_action
        if action == "get":
            print_json(client.get(args.job_id))
        elif action == "cancel":
            print_json(client.cancel(args.job_id))
        elif action == "delete":
            client.delete(args.job_id)
        elif action == "wait":
            print_json(client.wait(args.job_id, timeout=args.wait_timeout))
        elif action == "list":
            response = client.list_jobs(args.state, page_size=args.page_size, page_token=args.page_token)
            if args.json:
                print_json(response)
            else:
                for job in response.jobs:
                    print(_job_line(job))
                if response.next_page_token:
                    print(f"next page: --page-token {response.next_page_token}", file=sys.stderr)
        elif action == "watch":
            _watch(client, args)
    return 0


def register(add: Any, connection: argparse.ArgumentParser) -> None:
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
        action = actions.add_parser(name, help=summary, description=summary, parents=[connection])
        action.add_argument("job_id", help="the job id")
        if name == "watch":
            action.add_argument("--from-offset", type=int, default=0,
                                help="resume after this many output tokens")
            action.add_argument("--json", action="store_true", help="one JSON event per line")
        if name == "wait":
            action.add_argument("--wait-timeout", type=float, default=None, help="give up after S s")
    action = actions.add_parser("list", help="list jobs", description="list jobs, one per line",
                                parents=[connection])
    action.add_argument("--state", action="append", default=None,
                        help="only jobs in this state (queued, running, succeeded, ...), repeatable")
    action.add_argument("--page-size", type=int, default=0, help="jobs per page (server default 100)")
    action.add_argument("--page-token", default="", help="from a previous page")
    action.add_argument("--json", action="store_true", help="print the response as JSON")
