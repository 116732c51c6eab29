"""What the commands print: JSON of results (protobuf messages or the client's typed results),
readable enum names, and gRPC errors on stderr."""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
from collections.abc import Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from tokenrelay.errors import TokenRelayError


def jsonable(value: Any) -> Any:
    """Plain JSON data from a result: protobuf messages keep their field names (enums by name),
    dataclass results become objects, Python enums their `str()`."""
    if isinstance(value, Message):
        return json_format.MessageToDict(value, preserving_proto_field_name=True)
    if isinstance(value, enum.Enum):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "__slots__") or hasattr(value, "__dict__"):  # a small typed result object
        names = getattr(value, "__slots__", None) or vars(value)
        return {name: jsonable(getattr(value, name)) for name in names if not name.startswith("_")}
    return str(value)


def print_json(value: Any, *, indent: int | None = 2) -> None:
    print(json.dumps(jsonable(value), indent=indent), flush=True)


def enum_name(value: Any, proto_enum: Any, prefix: str) -> str:
    """`eos` / `succeeded` for a proto enum int (FINISH_REASON_EOS) or a Python enum member."""
    if isinstance(value, enum.Enum):
        text = str(value)
        return text.rsplit(".", 1)[-1].lower() if "." in text else text
    try:
        return str(proto_enum.Name(int(value))).removeprefix(prefix).lower()
    except (TypeError, ValueError):
        return str(value)


def report_error(error: TokenRelayError) -> None:
    print(f"error: {error.code.name}: {error.message}", file=sys.stderr)
    for field, description in getattr(error, "field_violations", ()) or ():
        print(f"  {field}: {description}", file=sys.stderr)
    retry_delay = getattr(error, "retry_delay", None)
    if retry_delay is not None:
        print(f"  retry after {retry_delay:g} s", file=sys.stderr)
    request_id = getattr(error, "request_id", None)
    if request_id:
        print(f"  request id: {request_id}", file=sys.stderr)
