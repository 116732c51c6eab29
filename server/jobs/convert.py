"""Where the Jobs protos meet the job domain types (jobs.proto <-> server.jobs.model).

Inbound: `job_from_submit` validates a SubmitJobRequest (the generation params through
`server.convert.request_from_params`, so the rules are the interactive ones) and builds a queued
Job with its seed fixed. `engine_request` rebuilds the engine Request of an attempt from the
stored params. Outbound: `job_to_proto`, watch events, and the result blobs a Job carries.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

from google.protobuf import timestamp_pb2
from google.rpc import code_pb2
from tokenrelay.v1 import generation_pb2, jobs_pb2

from tokenrelay_engines.base import InvalidRequest, ModelInfo, Request
from tokenrelay_server.chat import ChatEncoder
from tokenrelay_server.convert import ResultAccumulator, new_seed, request_from_params
from tokenrelay_server.errors import InvalidRequests
from tokenrelay_server.limits import InputLimits
from tokenrelay_server.jobs.model import (
    Delta, Job, JobError, JobsConfig, JobState, JobTier, Transition, WebhookDelivery, new_job_id,
)

MAX_LABELS = 64
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 256
MAX_ATTEMPTS_LIMIT = 100
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100

_STATES = {
    JobState.QUEUED: jobs_pb2.JOB_STATE_QUEUED, JobState.RUNNING: jobs_pb2.JOB_STATE_RUNNING,
    JobState.SUCCEEDED: jobs_pb2.JOB_STATE_SUCCEEDED, JobState.FAILED: jobs_pb2.JOB_STATE_FAILED,
    JobState.CANCELLED: jobs_pb2.JOB_STATE_CANCELLED, JobState.EXPIRED: jobs_pb2.JOB_STATE_EXPIRED,
    JobState.DEAD_LETTER: jobs_pb2.JOB_STATE_DEAD_LETTER,
}
_STATES_BACK = {v: k for k, v in _STATES.items()}
_TIERS = {
    jobs_pb2.JOB_PRIORITY_UNSPECIFIED: JobTier.STANDARD, jobs_pb2.JOB_PRIORITY_URGENT: JobTier.URGENT,
    jobs_pb2.JOB_PRIORITY_STANDARD: JobTier.STANDARD, jobs_pb2.JOB_PRIORITY_BULK: JobTier.BULK,
}
_TIERS_BACK = {JobTier.URGENT: jobs_pb2.JOB_PRIORITY_URGENT, JobTier.STANDARD: jobs_pb2.JOB_PRIORITY_STANDARD,
               JobTier.BULK: jobs_pb2.JOB_PRIORITY_BULK}

# Stored params passed the submitting server's limits; a re-run never re-applies byte limits.
_STORED_LIMITS = InputLimits(**{name: 1 << 62 for name in InputLimits.__slots__})
WebhookCheck = Callable[[str], None]  # raises InvalidRequest("webhook.url", ...)


def fingerprint(request: jobs_pb2.SubmitJobRequest) -> str:
    """What "the same request" means for an idempotency key: everything but the key itself."""
    copy = jobs_pb2.SubmitJobRequest()
    copy.CopyFrom(request)
    copy.idempotency_key = ""
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def _seconds(msg, name: str, default: float, field: str, bad: list[tuple[str, str]]) -> float:
    if not msg.HasField(name):
        return default
    d = getattr(msg, name)
    value = d.seconds + d.nanos / 1e9
    if value < 0:
        bad.append((field, f"must be >= 0, got {value}s"))
        return default
    return value


def job_from_submit(request: jobs_pb2.SubmitJobRequest, *, config: JobsConfig, info: ModelInfo,
                    tokenize: Callable[[str], list[int]], check_webhook: WebhookCheck | None,
                    now: float, limits: InputLimits, encode_chat: ChatEncoder | None = None) -> Job:
    """A queued Job for `request`; raises InvalidRequests naming every bad field.

    Byte limits are checked before anything is tokenized or stored.
    """
    bad: list[tuple[str, str]] = []
    if not request.HasField("params"):
        raise InvalidRequests([("params", "generation params are required")])
    limits.check_bytes(bad, "idempotency_key", request.idempotency_key, limits.max_idempotency_key_bytes)
    if request.HasField("webhook"):
        limits.check_bytes(bad, "webhook.url", request.webhook.url, limits.max_webhook_url_bytes)
    if bad:
        raise InvalidRequests(bad)
    job_id = new_job_id()
    params = generation_pb2.GenerationParams()
    params.CopyFrom(request.params)
    if not params.sampling.HasField("seed"):
        params.sampling.seed = new_seed()  # fixed now: a re-run yields the same tokens
    try:
        engine_req = request_from_params(params, request_id=params.request_id or job_id, info=info,
                                         tokenize=tokenize, arrival_time=0.0, deadline=None, limits=limits,
                                         encode_chat=encode_chat)
    except InvalidRequests as exc:
        bad += exc.violations
        engine_req = None
    except InvalidRequest as exc:
        bad.append((exc.field, exc.description))
        engine_req = None
    if request.priority not in _TIERS:
        bad.append(("priority", f"unknown job priority {request.priority}"))
    queue_ttl = _seconds(request, "queue_ttl", config.queue_ttl, "queue_ttl", bad)
    retention = _seconds(request, "result_retention", config.retention, "result_retention", bad)
    max_attempts = config.max_attempts
    if request.HasField("max_attempts"):
        max_attempts = request.max_attempts
        if not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT:
            bad.append(("max_attempts", f"must be in [1, {MAX_ATTEMPTS_LIMIT}], got {max_attempts}"))
            max_attempts = 1
    webhook_url = request.webhook.url if request.HasField("webhook") else ""
    if request.HasField("webhook"):
        if check_webhook is None:
            bad.append(("webhook.url", "webhooks are not enabled on this server"))
        else:
            try:
                check_webhook(webhook_url)
            except InvalidRequest as exc:
                bad.append((exc.field, exc.description))
    if len(request.labels) > MAX_LABELS:
        bad.append(("labels", f"at most {MAX_LABELS} labels"))
    for key, value in request.labels.items():
        if not key or len(key) > MAX_LABEL_KEY:
            bad.append((f"labels[{key[:32]!r}]", f"label keys must have 1 to {MAX_LABEL_KEY} characters"))
        if len(value) > MAX_LABEL_VALUE:
            bad.append((f"labels[{key[:32]!r}]", f"label values have at most {MAX_LABEL_VALUE} characters"))
    if bad or engine_req is None:
        raise InvalidRequests(bad)
    return Job(job_id=job_id, tier=_TIERS[request.priority], params=params.SerializeToString(),
               fingerprint=fingerprint(request), seed=params.sampling.seed,
               max_tokens=engine_req.stopping.max_tokens, priority=params.priority,
               idempotency_key=request.idempotency_key, labels=dict(request.labels), webhook_url=webhook_url,
               queue_ttl=queue_ttl, retention=retention, max_attempts=max_attempts,
               history=[Transition(JobState.QUEUED, now)], create_time=now, update_time=now)


def job_params(job: Job) -> generation_pb2.GenerationParams:
    return generation_pb2.GenerationParams.FromString(job.params)


def result_request_id(job: Job) -> str:
    return job_params(job).request_id or job.job_id


def engine_request(job: Job, *, info: ModelInfo, tokenize: Callable[[str], list[int]],
                   arrival_time: float, encode_chat: ChatEncoder | None = None) -> Request:
    """The engine Request of the job's current attempt, at the job's engine priority."""
    params = job_params(job)
    request = request_from_params(params, request_id=f"{job.job_id}.{job.attempts}", info=info,
                                  tokenize=tokenize, arrival_time=arrival_time, deadline=None,
                                  limits=_STORED_LIMITS, encode_chat=encode_chat)
    request.priority = job.engine_priority
    return request


def new_accumulator(job: Job) -> ResultAccumulator:
    params = job_params(job)
    return ResultAccumulator(result_request_id(job), seed=job.seed, want_logprobs=params.HasField("logprobs"))


def result_bytes(acc: ResultAccumulator) -> bytes:
    return acc.result().SerializeToString()


def partial_result(job: Job, token_ids: list[int], text: str) -> bytes:
    """The result of a job cancelled mid-way: the output persisted so far."""
    return generation_pb2.GenerationResult(
        request_id=result_request_id(job), text=text, token_ids=token_ids,
        finish_reason=generation_pb2.FINISH_REASON_CANCELLED, seed=job.seed,
        usage=generation_pb2.Usage(completion_tokens=len(token_ids))).SerializeToString()


def error(code: int, message: str) -> JobError:
    return JobError(code=code, message=message)


INTERNAL = code_pb2.INTERNAL
INVALID_ARGUMENT = code_pb2.INVALID_ARGUMENT
UNAVAILABLE = code_pb2.UNAVAILABLE


# -- outbound -------------------------------------------------------------------------------

def _ts(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(round(t * 1e9)))
    return ts


def state_to_proto(state: JobState) -> int:
    return _STATES[state]


def states_from_proto(values: list[int]) -> frozenset[JobState]:
    out = set()
    for i, v in enumerate(values):
        if v not in _STATES_BACK:
            raise InvalidRequests([(f"states[{i}]", f"unknown job state {v}")])
        out.add(_STATES_BACK[v])
    return frozenset(out)


def job_to_proto(job: Job) -> jobs_pb2.Job:
    msg = jobs_pb2.Job(
        job_id=job.job_id, state=_STATES[job.state], priority=_TIERS_BACK[job.tier], params=job_params(job),
        history=[jobs_pb2.StateTransition(state=_STATES[t.state], time=_ts(t.time)) for t in job.history],
        create_time=_ts(job.create_time), update_time=_ts(job.update_time), attempts=job.attempts,
        max_attempts=job.max_attempts, completion_tokens=job.completion_tokens, max_tokens=job.max_tokens,
        idempotency_key=job.idempotency_key, seed=job.seed, labels=job.labels,
        webhook_deliveries=[jobs_pb2.WebhookDelivery(attempt=d.attempt, time=_ts(d.time), http_status=d.http_status,
                                                     error=d.error) for d in job.webhook_deliveries])
    expire = job.expire_time
    if expire is not None:
        msg.expire_time.CopyFrom(_ts(expire))
    if job.result is not None:
        msg.result.ParseFromString(job.result)
    if job.last_error is not None:
        msg.last_error.CopyFrom(jobs_pb2.JobError(code=job.last_error.code, message=job.last_error.message))
    return msg


def state_event(t: Transition) -> jobs_pb2.WatchJobResponse:
    return jobs_pb2.WatchJobResponse(state_change=jobs_pb2.JobStateChange(state=_STATES[t.state], time=_ts(t.time)))


def delta_event(d: Delta) -> jobs_pb2.WatchJobResponse:
    return jobs_pb2.WatchJobResponse(delta=jobs_pb2.JobDelta(token_offset=d.offset, token_ids=list(d.token_ids),
                                                             text=d.text))


def ended_event(job: Job) -> jobs_pb2.WatchJobResponse:
    return jobs_pb2.WatchJobResponse(ended=job_to_proto(job))


def webhook_payload(job: Job) -> bytes:
    """The JSON body of a job's end-of-life webhook."""
    body: dict = {"type": f"job.{job.state.value}", "job_id": job.job_id, "state": job.state.value,
                  "attempts": job.attempts, "completion_tokens": job.completion_tokens,
                  "labels": job.labels, "end_time": job.end_time}
    if job.result is not None:
        r = generation_pb2.GenerationResult.FromString(job.result)
        body["result"] = {"text": r.text, "finish_reason": generation_pb2.FinishReason.Name(r.finish_reason),
                          "completion_tokens": r.usage.completion_tokens}
    if job.last_error is not None:
        body["error"] = {"code": job.last_error.code, "message": job.last_error.message}
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def webhook_delivery(attempt: int, time: float, http_status: int, err: str) -> WebhookDelivery:
    return WebhookDelivery(attempt=attempt, time=time, http_status=http_status, error=err)
