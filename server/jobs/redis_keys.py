"""Key names of the Redis job store (see `server.jobs.redis_store` for what each holds), how a
job is read back from its hash, and ListJobs page tokens."""

from __future__ import annotations

import base64
import json

from tokenrelay_server.jobs.model import Job, Progress


class RedisKeys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.index = f"{prefix}:index"
        self.qdeadline = f"{prefix}:qdeadline"
        self.deleteat = f"{prefix}:deleteat"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def deltas(self, job_id: str) -> str:
        return f"{self.prefix}:deltas:{job_id}"

    def ev(self, job_id: str) -> str:
        return f"{self.prefix}:ev:{job_id}"

    def idem(self, key: str) -> str:
        return f"{self.prefix}:idem:{key}"


def load_job(doc: str, progress: str | None) -> Job:
    """A job from its hash: the document with the progress kept beside it applied."""
    job = Job.from_dict(json.loads(doc))
    if progress is not None:  # absent in hashes written before progress was kept apart
        job.apply(Progress.from_list(json.loads(progress)))
    return job


def encode_token(member: str) -> str:
    return base64.urlsafe_b64encode(f"r:{member}".encode()).decode()


def decode_token(token: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("page_token is not one this server issued") from exc
    if not raw.startswith("r:"):
        raise ValueError("page_token is not one this server issued")
    return raw[2:]
