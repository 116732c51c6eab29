"""What the CLI prints for results: protobuf messages (enum names, proto field names) and typed
result objects (dataclasses or slotted classes with Python enums whose str() is `eos`)."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from tokenrelay.cli._output import enum_name, jsonable
from tokenrelay.v1 import generation_pb2, jobs_pb2


class FinishReason(enum.Enum):
    EOS = "eos"
    LENGTH = "length"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class Result:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    usage: Usage


class Slotted:
    __slots__ = ("job_id", "state", "_private")

    def __init__(self) -> None:
        self.job_id, self.state, self._private = "job_1", jobs_pb2.JOB_STATE_RUNNING, object()


def test_protobuf_results_keep_field_and_enum_names():
    result = generation_pb2.GenerationResult(text="579", finish_reason=generation_pb2.FINISH_REASON_EOS)
    data = jsonable(result)
    assert data["text"] == "579" and data["finish_reason"] == "FINISH_REASON_EOS"


def test_typed_results_become_plain_json():
    result = Result("579", (9, 11, 13), FinishReason.EOS, Usage(9, 4))
    data = jsonable(result)
    assert data == {"text": "579", "token_ids": [9, 11, 13], "finish_reason": "eos",
                    "usage": {"prompt_tokens": 9, "completion_tokens": 4}}
    json.dumps(data)
    assert jsonable(Slotted()) == {"job_id": "job_1", "state": jobs_pb2.JOB_STATE_RUNNING}
    assert jsonable({"a": (1, FinishReason.LENGTH)}) == {"a": [1, "length"]}


def test_enum_names_read_the_same_from_ints_and_enums():
    assert enum_name(generation_pb2.FINISH_REASON_EOS, generation_pb2.FinishReason, "FINISH_REASON_") == "eos"
    assert enum_name(FinishReason.LENGTH, generation_pb2.FinishReason, "FINISH_REASON_") == "length"
    assert enum_name(jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JobState, "JOB_STATE_") == "succeeded"
    assert enum_name(999, jobs_pb2.JobState, "JOB_STATE_") == "999"  # unknown to these stubs
