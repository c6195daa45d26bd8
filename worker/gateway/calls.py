"""What both HTTP APIs share: one HTTP request becomes one ``Job``, one RPC over Direct Reply-to through
``EmbedClient``; every way it can fail becomes one ``Failure`` with its HTTP status, which each API then writes in
its own error shape.

The worker is asked for float32 replies (``reply_encoding: float32``): the vectors arrive as the bytes of a
little-endian float32 array, which is exactly OpenAI's ``base64`` encoding, and for JSON answers they are formatted
once, by orjson, from that array. No vector is parsed from text or formatted twice on the way.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.client import EmbedClient, EmbedClientError, lane_key
from worker.errors import ErrorCode
from worker.messages import ErrorReply, MalformedReply, decode_reply
from worker.vectors import FloatArray

# Retry-After, in seconds: the gateway itself full (GATEWAY_MAX_IN_FLIGHT, connections), no worker or broker for now;
# and the API budget or the API's quota exhausted, for which the worker's reply gives no figure.
RETRY_AFTER_BUSY_S = 1
RETRY_AFTER_RATE_LIMITED_S = 10


class Failure(Exception):
    """An answer other than vectors: the HTTP status, a short code, a caller-readable message, the request field at
    fault (``param``), and for 429 and 503 how long to wait."""

    def __init__(
        self, status: int, code: str, message: str, *, param: str | None = None, retry_after: int | None = None
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.retry_after = retry_after


def bad_request(message: str, param: str | None = None) -> Failure:
    return Failure(400, "invalid_request", message, param=param)


def unknown_model(model: str, served: frozenset[str]) -> Failure:
    return Failure(
        404,
        "model_not_found",
        f"The model {model[:100]!r} is not served here; the workers serve {sorted(served)}",
        param="model",
    )


def too_large(limit: int) -> Failure:
    return Failure(413, "request_too_large", f"Request payload size exceeds the limit: {limit} bytes.")


def overloaded(limit: int) -> Failure:
    return Failure(
        429,
        "overloaded",
        f"the gateway is serving {limit} requests (GATEWAY_MAX_IN_FLIGHT); try again shortly",
        retry_after=RETRY_AFTER_BUSY_S,
    )


@dataclass(frozen=True, slots=True)
class Job:
    """One RPC to the workers: the request body on the wire (``worker.messages``' format, asking for float32), how
    many vectors it yields, and where and how long it goes."""

    body: bytes
    count: int
    model: str
    tokens: int  # the worker's estimate (``limits.estimate_tokens``), for OpenAI's ``usage``
    lane: str = "default"
    timeout: float = 30.0


async def embed(client: EmbedClient, job: Job) -> FloatArray:
    """The vectors of ``job`` (count x dimensions, float32), or a ``Failure``."""
    try:
        message = await client.request(job.body, timeout=job.timeout, routing_key=lane_key(job.lane))
    except EmbedClientError as exc:
        raise from_client_error(exc) from None
    props = message.header.properties
    try:
        return decode_reply(message.body, props.content_type, props.headers, count=job.count)
    except ErrorReply as exc:
        raise from_error_reply(exc.code, exc.message) from None
    except MalformedReply as exc:
        raise Failure(502, "malformed_reply", f"the worker's reply does not follow the wire contract: {exc}") from None


def from_error_reply(code: str, message: str) -> Failure:
    """A worker's error reply (README, Failure semantics) as an HTTP answer."""
    if code == ErrorCode.INVALID_REQUEST:
        if message.startswith("unknown model"):  # the workers serve other models than GEMINI_MODEL/ALLOWED_MODELS say
            return Failure(404, "model_not_found", message, param="model")
        if message.startswith("body is") and "the limit is" in message:
            return Failure(413, "request_too_large", message)
        return bad_request(message, _param(message))
    if code == ErrorCode.RATE_LIMITED:
        return Failure(429, "rate_limited", message, retry_after=RETRY_AFTER_RATE_LIMITED_S)
    if code == ErrorCode.DEADLINE_EXCEEDED:
        return Failure(504, "timeout", message)
    if code == ErrorCode.STORE_UNAVAILABLE:
        return Failure(503, "unavailable", message, retry_after=RETRY_AFTER_BUSY_S)
    # upstream_error (Gemini failed after the worker's retries), internal, or a code this gateway does not know
    return Failure(502, code if code == ErrorCode.UPSTREAM_ERROR else "upstream_error", message)


def from_client_error(exc: EmbedClientError) -> Failure:
    """The client's own failures; the worker's codes go through ``from_error_reply``."""
    if exc.code == "timeout":
        return Failure(504, "timeout", "no answer from the workers within the request's timeout")
    if exc.code in ("connection_lost", "unreachable"):
        return Failure(
            503, "unavailable", f"the broker is not reachable: {exc.message}", retry_after=RETRY_AFTER_BUSY_S
        )
    if exc.code == "unroutable":
        return Failure(503, "unavailable", f"no worker serves this lane: {exc.message}", retry_after=RETRY_AFTER_BUSY_S)
    if exc.code == "malformed_reply":
        return Failure(502, "malformed_reply", exc.message)
    return from_error_reply(exc.code, exc.message)


_PARAMS = {"output_dimensionality": "dimensions", "text": "input", "texts": "input", "inputs": "input"}


def _param(message: str) -> str | None:
    """The request field a worker's ``invalid_request`` names first ("output_dimensionality must be ...",
    "text 3 is empty"), in OpenAI's names."""
    first = message.split(" ", 1)[0].split(":", 1)[0].split(".", 1)[0]
    return _PARAMS.get(first)
