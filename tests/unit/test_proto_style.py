"""API rules of our own that `buf lint` (STANDARD, run by .ci/run) does not check."""

from __future__ import annotations

from google.protobuf import descriptor as _d

from tokenrelay.v1 import generation_pb2, jobs_pb2, text_generation_pb2

FILES = [generation_pb2.DESCRIPTOR, text_generation_pb2.DESCRIPTOR, jobs_pb2.DESCRIPTOR]
_SCALARS = {_d.FieldDescriptor.TYPE_MESSAGE, _d.FieldDescriptor.TYPE_GROUP, _d.FieldDescriptor.TYPE_ENUM}


def test_every_sampling_and_stopping_number_is_proto3_optional() -> None:
    """Zero is a value, not "unset": every numeric knob a client may leave out is `optional`."""
    for name in ("SamplingParams", "StoppingCriteria"):
        message = generation_pb2.DESCRIPTOR.message_types_by_name[name]
        for field in message.fields:
            if field.type in _SCALARS or field.type == _d.FieldDescriptor.TYPE_BOOL:
                continue
            if field.is_repeated:
                continue
            assert field.has_presence, f"{field.full_name} must be proto3 optional"


def test_every_service_and_rpc_is_in_package_tokenrelay_v1() -> None:
    names = {s.full_name for fd in FILES for s in fd.services_by_name.values()}
    assert names == {"tokenrelay.v1.TextGenerationService", "tokenrelay.v1.JobsService"}
