"""Logging set-up: readable text by default, JSON lines on request; and escaping of what callers control.

Every caller-supplied value that reaches a log line (correlation ids, message ids, reply_to names, texts
quoted in error messages) goes through ``safe``: a newline in a correlation id must not forge a log line, and
bytes that were not valid UTF-8 (amqp/codec.py keeps them as surrogate escapes) must not break a formatter.
"""

from __future__ import annotations

import logging
import sys
import time
from urllib.parse import urlsplit, urlunsplit

import orjson

LOGGED_LENGTH = 200  # characters of one caller-supplied value in a log line


def safe(value: object, limit: int = LOGGED_LENGTH) -> str:
    """``value`` as printable text: control characters, line separators and undecodable bytes escaped
    (``\\n``, ``\\u2028``, ``\\xff``), cut to ``limit`` characters."""
    text = str(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not valid UTF-8, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    return ch.encode("unicode_escape").decode("ascii")


def redact_url(url: str) -> str:
    """The URL (or comma-separated URLs) with any password replaced, for logs and messages."""
    if "," in url:
        return ",".join(redact_url(part.strip()) for part in url.split(","))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"  # AMQP_URL's default, for ``run`` and the client commands


def check_amqp_url(value: str) -> None:
    """Raise ValueError unless ``value`` is one or more comma-separated amqp:// or amqps:// URLs, each with a
    valid port or none. The message never holds a password. Here, beside ``redact_url``, rather than in
    ``worker.settings``: the client commands check their broker URL without importing pydantic (~0.2 s)."""
    urls = [u.strip() for u in value.split(",") if u.strip()]
    if not urls:
        raise ValueError("is empty")
    for url in urls:
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # an unclosed "[" of an IPv6 address
            raise ValueError(f"not a URL: {exc}") from None
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError("must start with amqp:// or amqps:// (several, for a cluster's nodes: comma-separated)")
        try:
            port = parts.port  # urllib raises for a port that is not a number from 0 to 65535
        except ValueError:
            port = -1
        if port is None or 0 < port <= 65535:
            continue
        # Not redact_url: it reads the port, so it raises on this very URL (and drops a port 0).
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        shown = url.replace(parts.netloc, f"{user}:***@{hostport}", 1) if colon else url
        given = hostport.rpartition("]")[2].partition(":")[2]
        raise ValueError(f"port {given!r} in {shown} is not a number from 1 to 65535")


def context(correlation_id: str | None) -> dict[str, str | None]:
    """The structured fields of a request's log lines (JSON logs show them as fields)."""
    return {"correlation_id": None if correlation_id is None else safe(correlation_id)}


def _escape_args(record: logging.LogRecord) -> bool:
    """A handler filter, behind ``safe`` at the call sites: any string argument of any logger (ours or a
    library's) that holds control characters or undecodable bytes is escaped before it is formatted."""
    args = record.args
    if isinstance(args, tuple) and any(isinstance(a, str) and not a.isprintable() for a in args):
        record.args = tuple(safe(a, len(a)) if isinstance(a, str) else a for a in args)
    return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        correlation_id = getattr(record, "correlation_id", None)
        if correlation_id is not None:
            entry["correlation_id"] = correlation_id
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(entry).decode()
        except TypeError:  # a lone surrogate orjson refuses: escape everything and try again
            return orjson.dumps({k: safe(v, len(str(v))) for k, v in entry.items()}).decode()


def configure(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(_escape_args)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party debug output can echo request headers (API keys); httpx logs every request at INFO.
    # Our own DEBUG lines already carry each batch's size, wait and latency.
    for noisy in ("httpx", "httpcore", "google_genai", "google.genai", "aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
