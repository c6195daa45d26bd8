"""JSON log lines carry the request's correlation_id as a field of its own."""

from __future__ import annotations

import io
import json
import logging

from worker.logs import JsonFormatter


def test_json_lines_carry_correlation_id_and_exceptions() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info("request failed (correlation_id=%s)", "c-1", extra={"correlation_id": "c-1"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("internal error", extra={"correlation_id": "c-2"})
        logger.info("no request here")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["correlation_id"] == "c-1" and lines[0]["level"] == "INFO"
    assert lines[0]["message"] == "request failed (correlation_id=c-1)"
    assert lines[1]["correlation_id"] == "c-2" and "ValueError: boom" in lines[1]["exc"]
    assert "correlation_id" not in lines[2]
    assert lines[0]["ts"].endswith("Z")
