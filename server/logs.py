"""Logging set-up: text or JSON lines, each carrying the request id, tenant and trace id of
the call it is about (from tokenrelay_server.call_context), and the access-log fields when present.

    configure_logging(level="INFO", log_format="json")
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

from tokenrelay_server import call_context

_CONTEXT_FIELDS = ("request_id", "tenant", "trace_id")


class CallContextFilter(logging.Filter):
    """Adds request_id, tenant and trace_id ("" outside a call) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = call_context.current()
        for name in _CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, getattr(info, name, "") if info is not None else "")
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the call's ids, access fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage(),
        }
        for name in _CONTEXT_FIELDS:
            value = getattr(record, name, "")
            if value:
                out[name] = value
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update(access)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = " ".join(f"{n}={getattr(record, n)}" for n in _CONTEXT_FIELDS if getattr(record, n, ""))
        return f"{line} [{ids}]" if ids else line


def make_handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(CallContextFilter())
    return handler


def configure_logging(level: str, log_format: str) -> None:
    """The root logger writes `log_format` lines to stderr (unless a host already set handlers)."""
    root = logging.getLogger()
    if root.handlers:
        return
    root.addHandler(make_handler(log_format))
    root.setLevel(level)
