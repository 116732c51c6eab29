"""The API follows buf's STANDARD lint rules (checked from the compiled descriptors)."""

from __future__ import annotations

import re

import pytest
from google.protobuf import descriptor as _d

from tokenrelay.v1 import generation_pb2, jobs_pb2, text_generation_pb2

FILES = [generation_pb2.DESCRIPTOR, text_generation_pb2.DESCRIPTOR, jobs_pb2.DESCRIPTOR]
PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")
LOWER_SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _snake_upper(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


@pytest.mark.parametrize("fd", FILES, ids=lambda fd: fd.name)
def test_package_is_versioned_and_matches_directory(fd: _d.FileDescriptor) -> None:
    assert fd.package == "tokenrelay.v1"
    assert fd.name.startswith("tokenrelay/v1/")


@pytest.mark.parametrize("fd", FILES, ids=lambda fd: fd.name)
def test_names_follow_standard_casing(fd: _d.FileDescriptor) -> None:
    def walk(messages):
        for m in messages:
            yield m
            yield from walk(m.nested_types)

    for message in walk(fd.message_types_by_name.values()):
        if message.GetOptions().map_entry:
            continue
        assert PASCAL.match(message.name), message.full_name
        for field in message.fields:
            assert LOWER_SNAKE.match(field.name), field.full_name
    for enum in fd.enum_types_by_name.values():
        prefix = _snake_upper(enum.name) + "_"
        assert enum.values[0].name == prefix + "UNSPECIFIED" and enum.values[0].number == 0
        for value in enum.values:
            assert UPPER_SNAKE.match(value.name) and value.name.startswith(prefix), value.name


@pytest.mark.parametrize("fd", FILES, ids=lambda fd: fd.name)
def test_rpcs_have_unique_standard_request_response(fd: _d.FileDescriptor) -> None:
    seen: set[str] = set()
    for service in fd.services_by_name.values():
        assert PASCAL.match(service.name)
        for method in service.methods:
            assert method.input_type.name == f"{method.name}Request", method.full_name
            assert method.output_type.name == f"{method.name}Response", method.full_name
            for t in (method.input_type.full_name, method.output_type.full_name):
                assert t not in seen, f"{t} used by more than one RPC"
                seen.add(t)
