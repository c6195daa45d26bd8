"""The wire format: request and reply bodies, decoded and encoded to bytes. No AMQP here.

A request arrives as JSON bytes plus a few message properties; ``decode_request`` turns that into a
validated ``EmbedRequest`` or raises ``InvalidRequest`` with a message fit to send back to the caller.
Replies are encoded with orjson straight from the float32 array, so the vectors are turned into text
exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr, ValidationError

from worker import limits
from worker.errors import EmbedError, InvalidRequest

JSON_CONTENT_TYPE = "application/json"
# Opt-in binary success reply: the vectors as little-endian float32, row after row, with the shape in
# headers. A 3,072-dimension vector is 12 KiB this way against ~36 KiB as JSON text, and costs no
# float formatting. Error replies stay JSON.
FLOAT32_CONTENT_TYPE = "application/x-embeddings-float32"
DEADLINE_HEADER = "x-deadline"

Vectors = npt.NDArray[np.float32]


# ---------------------------------------------------------------- wire schemas (documented in README)
class EmbedRequestBody(BaseModel):
    """``{"texts": [...]}`` or ``{"text": "..."}`` with optional configuration."""

    model_config = ConfigDict(extra="forbid", strict=True)

    texts: list[StrictStr] | None = None
    text: StrictStr | None = None
    model: StrictStr | None = None
    task_type: StrictStr | None = None
    output_dimensionality: StrictInt | None = None
    # Cut texts over the model's input limit instead of rejecting them.
    truncate: StrictBool = False
    reply_encoding: Literal["json", "float32"] = "json"


class DeferredItem(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    key: StrictStr
    text: StrictStr


class DeferredRequestBody(BaseModel):
    """``{"items": [{"key": "doc:1", "text": "..."}, ...]}`` for the fire-and-forget lane."""

    model_config = ConfigDict(extra="forbid", strict=True)

    items: list[DeferredItem]
    model: StrictStr | None = None
    task_type: StrictStr | None = None
    output_dimensionality: StrictInt | None = None
    truncate: StrictBool = False


class EmbedReply(BaseModel):
    embeddings: list[list[float]]
    model: str
    dimensions: int


class ErrorDetail(BaseModel):
    code: str
    message: str
    retryable: bool


class ErrorReply(BaseModel):
    error: ErrorDetail


# ---------------------------------------------------------------- decoded request
@dataclass(frozen=True, slots=True)
class EmbedConfig:
    """What one upstream call is configured with; requests are only batched with equal configs."""

    model: str
    task_type: str | None = None
    # None means the model's full dimension.
    output_dimensionality: int | None = None

    @property
    def dimensions(self) -> int:
        return self.output_dimensionality or limits.full_dimensions(self.model)


@dataclass(frozen=True, slots=True)
class RequestLimits:
    default_model: str
    models: frozenset[str]
    max_body_bytes: int = 4 * 1024 * 1024
    max_texts: int = 1000
    max_tokens_per_text: int = limits.MAX_TOKENS_PER_TEXT


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    texts: list[str]
    config: EmbedConfig
    # Unix epoch seconds after which the caller no longer wants an answer, or None.
    deadline: float | None = None
    reply_encoding: str = "json"


def decode_request(
    body: bytes,
    *,
    content_type: str | None,
    headers: Mapping[str, Any] | None,
    limits_: RequestLimits,
) -> EmbedRequest:
    """Validate one request. Raises ``InvalidRequest`` with a caller-readable message."""
    raw = _json_object(body, content_type, limits_)
    try:
        parsed = EmbedRequestBody.model_validate(raw)
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from None

    texts = _texts(parsed, limits_)
    config = _config(parsed, limits_)
    return EmbedRequest(texts=texts, config=config, deadline=_deadline(headers), reply_encoding=parsed.reply_encoding)


def _json_object(body: bytes, content_type: str | None, limits_: RequestLimits) -> dict[str, Any]:
    if len(body) > limits_.max_body_bytes:
        raise InvalidRequest(f"body is {len(body)} bytes; the limit is {limits_.max_body_bytes}")
    if content_type and content_type.split(";")[0].strip().lower() != JSON_CONTENT_TYPE:
        raise InvalidRequest(f"content_type must be {JSON_CONTENT_TYPE}, got {content_type[:100]!r}")
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidRequest(f"body must be a JSON object, got {type(raw).__name__}")
    return raw


def _texts(parsed: EmbedRequestBody, limits_: RequestLimits) -> list[str]:
    if parsed.texts is not None and parsed.text is not None:
        raise InvalidRequest('give either "texts" or "text", not both')
    if parsed.texts is not None:
        texts = parsed.texts
    elif parsed.text is not None:
        texts = [parsed.text]
    else:
        raise InvalidRequest('missing "texts" (a list of strings) or "text" (a string)')
    return _checked_texts(texts, parsed.truncate, limits_, what="texts")


def _checked_texts(texts: list[str], truncate: bool, limits_: RequestLimits, *, what: str) -> list[str]:
    if not texts:
        raise InvalidRequest(f'"{what}" is empty')
    if len(texts) > limits_.max_texts:
        raise InvalidRequest(f"{len(texts)} {what} in one request; the limit is {limits_.max_texts}")
    max_chars = limits_.max_tokens_per_text * limits.CHARS_PER_TOKEN
    out = texts
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidRequest(f"text {i} is empty")
        if limits.estimate_tokens(text) > limits_.max_tokens_per_text:
            if not truncate:
                raise InvalidRequest(
                    f"text {i} is about {limits.estimate_tokens(text)} tokens; the model takes "
                    f'{limits_.max_tokens_per_text} (send "truncate": true to cut it)'
                )
            if out is texts:
                out = list(texts)
            out[i] = text[:max_chars]
    return out


def _config(parsed: EmbedRequestBody | DeferredRequestBody, limits_: RequestLimits) -> EmbedConfig:
    model = parsed.model or limits_.default_model
    model = model.removeprefix("models/")
    if model not in limits_.models:
        raise InvalidRequest(f"unknown model {model[:100]!r}; this worker serves {sorted(limits_.models)}")
    task_type = parsed.task_type
    if task_type is not None:
        task_type = task_type.upper()
        if task_type not in limits.TASK_TYPES:
            raise InvalidRequest(f"unknown task_type {task_type[:100]!r}")
    dims = parsed.output_dimensionality
    full = limits.full_dimensions(model)
    if dims is not None:
        if dims == full:
            dims = None  # same vectors as the default: let them share batches
        elif not limits.MIN_OUTPUT_DIMENSIONS <= dims <= full:
            raise InvalidRequest(f"output_dimensionality must be between {limits.MIN_OUTPUT_DIMENSIONS} and {full}")
    return EmbedConfig(model=model, task_type=task_type, output_dimensionality=dims)


@dataclass(frozen=True, slots=True)
class DeferredRequest:
    keys: list[str]
    texts: list[str]
    config: EmbedConfig


MAX_KEY_LENGTH = 1024


def decode_deferred(body: bytes, *, content_type: str | None, limits_: RequestLimits) -> DeferredRequest:
    """Validate one fire-and-forget request. Raises ``InvalidRequest``."""
    raw = _json_object(body, content_type, limits_)
    try:
        parsed = DeferredRequestBody.model_validate(raw)
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from None
    keys = [item.key for item in parsed.items]
    for i, key in enumerate(keys):
        if not key or len(key) > MAX_KEY_LENGTH:
            raise InvalidRequest(f"items.{i}.key must be 1 to {MAX_KEY_LENGTH} characters")
    texts = _checked_texts([item.text for item in parsed.items], parsed.truncate, limits_, what="items")
    return DeferredRequest(keys=keys, texts=texts, config=_config(parsed, limits_))


def _deadline(headers: Mapping[str, Any] | None) -> float | None:
    if not headers or DEADLINE_HEADER not in headers:
        return None
    value = headers[DEADLINE_HEADER]
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        millis = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"header {DEADLINE_HEADER} must be Unix epoch milliseconds") from None
    if not math.isfinite(millis):
        raise InvalidRequest(f"header {DEADLINE_HEADER} must be Unix epoch milliseconds")
    return millis / 1000.0


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


# ---------------------------------------------------------------- replies
@dataclass(frozen=True, slots=True)
class Reply:
    body: bytes
    content_type: str = JSON_CONTENT_TYPE
    headers: dict[str, Any] | None = None


def encode_vectors(vectors: Vectors, model: str, encoding: str = "json") -> Reply:
    """The success reply. orjson writes float32 arrays directly (shortest round-trip repr)."""
    count, dims = (int(n) for n in vectors.shape)
    if encoding == "float32":
        return Reply(
            vectors.astype("<f4", copy=False).tobytes(),
            FLOAT32_CONTENT_TYPE,
            {"x-model": model, "x-dimensions": dims, "x-count": count},
        )
    return Reply(
        orjson.dumps({"embeddings": vectors, "model": model, "dimensions": dims}, option=orjson.OPT_SERIALIZE_NUMPY)
    )


def decode_float32_reply(body: bytes, headers: Mapping[str, Any]) -> Vectors:
    """For callers: the (count, dimensions) float32 array of a binary reply."""
    return np.frombuffer(body, dtype="<f4").reshape(int(headers["x-count"]), int(headers["x-dimensions"]))


def encode_error(error: EmbedError) -> Reply:
    return Reply(
        orjson.dumps({"error": {"code": str(error.code), "message": error.message, "retryable": error.retryable}})
    )
