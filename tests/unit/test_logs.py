"""Log lines: JSON fields, and no caller-supplied value can forge a line or break a formatter."""

from __future__ import annotations

import io
import json
import logging

import pytest

from worker.logs import JsonFormatter, configure, context, safe


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


def _capture(fmt: str) -> tuple[io.StringIO, logging.Handler]:
    stream = io.StringIO()
    configure("INFO", fmt)
    handler = logging.getLogger().handlers[0]
    handler.stream = stream  # type: ignore[attr-defined]
    return stream, handler


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_newline_in_a_caller_value_cannot_forge_a_log_line(fmt: str) -> None:
    forged = "c-1\n2026-11-24 00:00:00,000 ERROR   worker.app: forged line"
    stream, _ = _capture(fmt)
    try:
        log = logging.getLogger("test.inject")
        log.warning("request refused (correlation_id=%s)", safe(forged), extra=context(forged))
        log.warning("a library logs it raw: %s", forged)  # the handler filter escapes it anyway
        log.warning("undecodable bytes: %s", "id-\udcff")
    finally:
        logging.getLogger().handlers.clear()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert all("\\n2026" in line for line in lines[:2]) and "\\xff" in lines[2]
    if fmt == "json":
        assert json.loads(lines[0])["correlation_id"] == safe(forged)


def test_safe_escapes_controls_and_keeps_text() -> None:
    assert safe("ok é 日本") == "ok é 日本"
    assert safe("a\r\nb\x1b[31m") == "a\\r\\nb\\x1b[31m"
    assert safe("x" * 300).endswith("...") and len(safe("x" * 300)) == 203
