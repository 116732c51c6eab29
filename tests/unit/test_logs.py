"""Log lines carry the call's request id, tenant and trace id; JSON lines parse."""

from __future__ import annotations

import io
import json
import logging

from tokenrelay_server import call_context
from tokenrelay_server.logs import make_handler


def _logger(fmt: str) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    logger = logging.getLogger(f"tokenrelay.test.{fmt}")
    logger.handlers[:] = [make_handler(fmt, out)]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger, out


def test_json_lines_carry_the_call_ids_and_access_fields() -> None:
    logger, out = _logger("json")
    logger.info("outside any call")
    info, token = call_context.enter("/tokenrelay.v1.TextGenerationService/Generate")
    try:
        info.request_id, info.tenant, info.trace_id = "req-1", "alice", "ab" * 16
        logger.info("inside %s", "a call", extra={"access": {"status": "OK", "duration_ms": 1.5}})
        try:
            raise ValueError("boom \"quoted\"\nnext line")
        except ValueError:
            logger.exception("failed")
    finally:
        call_context.leave(token)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 3
    assert "request_id" not in lines[0] and lines[0]["message"] == "outside any call"
    assert lines[1]["request_id"] == "req-1" and lines[1]["tenant"] == "alice" and lines[1]["trace_id"] == "ab" * 16
    assert lines[1]["message"] == "inside a call" and lines[1]["status"] == "OK" and lines[1]["level"] == "INFO"
    assert "boom" in lines[2]["exception"] and lines[2]["request_id"] == "req-1"
    assert call_context.current() is None


def test_text_lines_append_the_ids() -> None:
    logger, out = _logger("text")
    info, token = call_context.enter("/m")
    try:
        info.request_id = "req-2"
        logger.info("hello")
    finally:
        call_context.leave(token)
    assert out.getvalue().rstrip().endswith("hello [request_id=req-2]")
