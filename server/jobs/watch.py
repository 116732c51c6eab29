"""WatchJob's event order over a job store: state changes, output deltas from an offset as
they are persisted, the terminal state only after the last delta, then the ended job."""

from __future__ import annotations

from collections.abc import AsyncIterator

from tokenrelay_engines.base import InvalidRequest
from tokenrelay_server.jobs.model import Delta, Job, Transition
from tokenrelay_server.jobs.store import JobStore


async def watch_job(store: JobStore, job_id: str, from_offset: int) -> AsyncIterator[Transition | Delta | Job]:
    """State changes, then output deltas from `from_offset` as they are persisted, then the
    ended Job. Raises JobNotFound (also when the job is deleted mid-watch)."""
    job = await store.get(job_id)
    if from_offset > job.max_tokens:
        raise InvalidRequest("from_token_offset", f"the job generates at most {job.max_tokens} tokens")
    offset, text_pos, sent_states, first = from_offset, 0, 0, True
    while True:
        # the terminal state goes out after the last delta (persisted before the job ended)
        ending = [t for t in job.history[sent_states:] if t.state.terminal]
        for t in job.history[sent_states:]:
            if not t.state.terminal:
                yield t
        sent_states = len(job.history)
        deltas = await store.read_deltas(job_id, 0 if first else offset)
        for d in deltas:
            end = d.offset + len(d.token_ids)
            if first and end <= from_offset and d.token_ids:
                text_pos = d.text_offset + len(d.text)  # the client has this text already
                continue
            if end > offset:
                skip = max(0, offset - d.offset)
                yield Delta(d.offset + skip, d.token_ids[skip:], d.text if skip == 0 else "",
                            d.text_offset)
            elif not d.token_ids and d.text_offset >= text_pos and d.offset >= offset:
                yield d
            else:
                continue
            offset, text_pos = max(offset, end), d.text_offset + len(d.text)
        first = False
        if job.state.terminal:
            for t in ending:
                yield t
            yield job
            return
        await store.wait_for_update(job_id, job.version, 1.0)
        job = await store.get(job_id)
