"""The wire format, both directions and both sides: the one module that knows the bytes. No AMQP here.

Worker side: ``decode_request`` / ``decode_deferred`` turn JSON bytes (gzip-compressed or not) plus a few message
properties into a validated request (its inputs: texts, or contents of parts, see ``worker.inputs``) or raise
``InvalidRequest`` with a message fit to send back; ``encode_vectors`` / ``encode_error`` build replies (orjson
straight from the float32 array, so vectors are turned into text exactly once), and ``reply_bytes`` bounds a success
reply's size before any vector exists; ``encode_deferred_in`` sends items back to the deferred lane.
Caller side (``client.py``, the bench, the tests): ``encode_request`` / ``encode_deferred_items`` build requests,
``decode_reply`` / ``decode_flush_reply`` read replies and raise ``ErrorReply`` or ``MalformedReply``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from worker import limits
from worker.errors import EmbedError, InvalidRequest
from worker.inputs import EmbedInput, parse_parts
from worker.topology import DEADLINE_HEADER
from worker.vectors import FloatArray, JsonVector, Vector, as_array

if TYPE_CHECKING:
    from worker.settings import Settings

JSON_CONTENT_TYPE = "application/json"
# Opt-in binary success reply: the vectors as little-endian float32, row after row, with the shape in
# headers. A 3,072-dimension vector is 12 KiB this way against ~36 KiB as JSON text, and costs no
# float formatting. Error replies stay JSON.
FLOAT32_CONTENT_TYPE = "application/x-embeddings-float32"


# ---------------------------------------------------------------- requests (documented in README, "Wire contract")
# Validated by hand rather than by pydantic models: a profile of the worker showed per-message validation among
# its costs, and these few checks say the same things (field names in "where: what" form, as before).
_REQUEST_FIELDS = frozenset(
    {"texts", "text", "inputs", "model", "task_type", "output_dimensionality", "truncate", "reply_encoding"}
)
_DEFERRED_FIELDS = frozenset({"items", "model", "task_type", "output_dimensionality", "truncate"})
_ENCODINGS = ("json", "float32")
# Body encodings (the AMQP content_encoding property), compared in lower case; None or "" is "identity".
_GZIP_ENCODINGS = frozenset({"gzip", "x-gzip"})
_IDENTITY = "identity"


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
    max_body_bytes: int
    max_texts: int
    max_tokens_per_text: int | None  # None: each model's own limit (limits.MODELS)

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        return cls(
            default_model=settings.gemini_model,
            models=settings.models,
            max_body_bytes=settings.max_body_bytes,
            max_texts=settings.max_texts_per_request,
            max_tokens_per_text=settings.max_tokens_per_text,
        )

    def max_tokens(self, model: str) -> int:
        own = limits.model(model).max_tokens
        return min(own, self.max_tokens_per_text) if self.max_tokens_per_text else own


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    inputs: list[EmbedInput]  # one vector each, in order
    config: EmbedConfig
    # Unix epoch seconds after which the caller no longer wants an answer, or None.
    deadline: float | None = None
    reply_encoding: str = "json"


def decode_request(
    body: bytes,
    *,
    content_type: str | None,
    headers: Mapping[str, Any] | None,
    request_limits: RequestLimits,
    content_encoding: str | None = None,
) -> EmbedRequest:
    """Validate one request; ``content_encoding`` is the message's property (gzip, or none). Raises
    ``InvalidRequest`` with a caller-readable message."""
    raw = _json_object(body, content_type, content_encoding, request_limits)
    _known(raw, _REQUEST_FIELDS)
    config = _config(raw, request_limits)
    truncate = _flag(raw, "truncate")
    encoding = raw.get("reply_encoding", "json")
    if encoding not in _ENCODINGS:
        raise InvalidRequest(f"reply_encoding: Input should be 'json' or 'float32', got {str(encoding)[:40]!r}")
    given = [name for name in ("texts", "text", "inputs") if name in raw]
    if len(given) > 1:
        raise InvalidRequest(f'give one of "texts", "text" or "inputs", not both "{given[0]}" and "{given[1]}"')
    if not given:
        raise InvalidRequest('missing "texts" (a list of strings), "text" (a string) or "inputs" (a list of inputs)')
    if given[0] == "text":
        inputs: list[EmbedInput] = _checked_texts(
            [_string(raw["text"], "text")], truncate, config, request_limits, "texts"
        )
    elif given[0] == "texts":
        inputs = _checked_texts(_strings(raw["texts"], "texts"), truncate, config, request_limits, "texts")
    else:
        inputs = _inputs(raw["inputs"], truncate, config, request_limits)
    return EmbedRequest(inputs, config, deadline=_deadline(headers), reply_encoding=encoding)


def _json_object(
    body: bytes, content_type: str | None, content_encoding: str | None, request_limits: RequestLimits
) -> dict[str, Any]:
    if len(body) > request_limits.max_body_bytes:
        raise InvalidRequest(f"body is {len(body)} bytes; the limit is {request_limits.max_body_bytes}")
    if content_type and content_type.split(";")[0].strip().lower() != JSON_CONTENT_TYPE:
        raise InvalidRequest(f"content_type must be {JSON_CONTENT_TYPE}, got {content_type[:100]!r}")
    body = _decoded(body, content_encoding, request_limits.max_body_bytes)
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidRequest(f"body must be a JSON object, got {type(raw).__name__}")
    return raw


def _decoded(body: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The body as the JSON it encodes: as it is (identity), or gunzipped within ``limit`` bytes."""
    encoding = (content_encoding or _IDENTITY).strip().lower() or _IDENTITY
    if encoding == _IDENTITY:
        return body
    if encoding in _GZIP_ENCODINGS:
        return _gunzip(body, limit)
    raise InvalidRequest(f"content_encoding {(content_encoding or '')[:40]!r} is not supported (gzip or none)")


def _gunzip(body: bytes, limit: int) -> bytes:
    """The gzip member ``body`` holds, decompressed. A bomb costs about ``limit`` bytes, not what it would inflate to:
    the output is taken in small pieces and refused as soon as it passes the limit."""
    pieces, size = [], 0
    try:
        for piece in _inflated_pieces(body):
            size += len(piece)
            if size > limit:
                raise InvalidRequest(f"body decompresses to more than {limit} bytes; the limit is {limit}")
            pieces.append(piece)
    except zlib.error as exc:
        raise InvalidRequest(f"body is not valid gzip: {exc}") from None
    return b"".join(pieces)


_INFLATE_STEP = 64 * 1024  # bytes of input given, and of output taken, per decompress call


def _inflated_pieces(body: bytes) -> Iterator[bytes]:
    """The decompressed bytes of the one gzip member ``body`` must be, piece by piece."""
    member = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing only
    view, used = memoryview(body), 0
    while used < len(body) and not member.eof:
        data: bytes | memoryview = view[used : used + _INFLATE_STEP]
        used += len(data)
        while data and not member.eof:
            yield member.decompress(data, _INFLATE_STEP)
            data = member.unconsumed_tail
    if not member.eof:
        raise InvalidRequest("body is not valid gzip: it ends before its compressed data does")
    if member.unused_data or used < len(body):
        raise InvalidRequest("body is not valid gzip: bytes follow its end (one gzip member is taken)")


def _known(raw: dict[str, Any], fields: frozenset[str]) -> None:
    unknown = [name for name in raw if name not in fields]
    if unknown:
        raise InvalidRequest(f"{str(unknown[0])[:60]}: Extra inputs are not permitted")


def _string(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{where}: Input should be a valid string")
    return value


def _strings(value: Any, where: str) -> list[str]:
    if not isinstance(value, list):
        raise InvalidRequest(f"{where}: Input should be a valid list")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise InvalidRequest(f"{where}.{i}: Input should be a valid string")
    return value


def _flag(raw: dict[str, Any], name: str) -> bool:
    value = raw.get(name, False)
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name}: Input should be a valid boolean")
    return value


def _checked_texts(
    texts: list[str], truncate: bool, config: EmbedConfig, request_limits: RequestLimits, what: str
) -> list[EmbedInput]:
    if not texts:
        raise InvalidRequest(f'"{what}" is empty')
    if len(texts) > request_limits.max_texts:
        raise InvalidRequest(f"{len(texts)} {what} in one request; the limit is {request_limits.max_texts}")
    max_tokens = request_limits.max_tokens(config.model)
    max_chars = max_tokens * limits.CHARS_PER_TOKEN
    out: list[EmbedInput] = list(texts)
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidRequest(f"text {i} is empty")
        if len(text) > max_chars:
            if not truncate:
                raise InvalidRequest(
                    f"text {i} is about {limits.estimate_tokens(text)} tokens; {config.model} takes "
                    f'{max_tokens} (send "truncate": true to cut it)'
                )
            out[i] = text[:max_chars]
    return out


def _inputs(raw: Any, truncate: bool, config: EmbedConfig, request_limits: RequestLimits) -> list[EmbedInput]:
    """``inputs``: each item ``{"text": ...}`` or ``{"parts": [...]}``, one vector each."""
    if not isinstance(raw, list):
        raise InvalidRequest("inputs: Input should be a valid list")
    if not raw:
        raise InvalidRequest('"inputs" is empty')
    if len(raw) > request_limits.max_texts:
        raise InvalidRequest(f"{len(raw)} inputs in one request; the limit is {request_limits.max_texts}")
    out: list[EmbedInput] = []
    max_tokens = request_limits.max_tokens(config.model)
    for i, item in enumerate(raw):
        where = f"inputs.{i}"
        if not isinstance(item, dict) or len(item) != 1 or not ({"text", "parts"} & item.keys()):
            raise InvalidRequest(f'{where} must be {{"text": ...}} or {{"parts": [...]}}')
        if "text" in item:
            [text] = _checked_texts(
                [_string(item["text"], f"{where}.text")], truncate, config, request_limits, "inputs"
            )
            out.append(text)
            continue
        parsed = parse_parts(item["parts"], where, config.model)  # sent as it is: never cut
        if parsed.tokens > max_tokens:
            raise InvalidRequest(f"{where} is about {parsed.tokens} tokens; the limit is {max_tokens}")
        out.append(parsed)
    return out


def _config(raw: dict[str, Any], request_limits: RequestLimits) -> EmbedConfig:
    model = raw.get("model")
    model = request_limits.default_model if model is None else _string(model, "model")
    model = model.removeprefix("models/")
    if model not in request_limits.models:
        raise InvalidRequest(f"unknown model {model[:100]!r}; this worker serves {sorted(request_limits.models)}")
    task_type = raw.get("task_type")
    if task_type is not None:
        task_type = _string(task_type, "task_type").upper()
        if task_type not in limits.TASK_TYPES:
            raise InvalidRequest(f"unknown task_type {task_type[:100]!r}")
    dims = raw.get("output_dimensionality")
    full = limits.full_dimensions(model)
    if dims is not None:
        if not isinstance(dims, int) or isinstance(dims, bool):
            raise InvalidRequest("output_dimensionality: Input should be a valid integer")
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


def decode_deferred(
    body: bytes, *, content_type: str | None, request_limits: RequestLimits, content_encoding: str | None = None
) -> DeferredRequest:
    """Validate one fire-and-forget request (text items), gzip-compressed or not as for ``decode_request``. Raises
    ``InvalidRequest``."""
    raw = _json_object(body, content_type, content_encoding, request_limits)
    _known(raw, _DEFERRED_FIELDS)
    config = _config(raw, request_limits)
    truncate = _flag(raw, "truncate")
    items = raw.get("items")
    if not isinstance(items, list):
        raise InvalidRequest("items: Input should be a valid list")
    keys, texts = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or set(item) != {"key", "text"}:
            raise InvalidRequest(f'items.{i} must be {{"key": "...", "text": "..."}}')
        key = _string(item["key"], f"items.{i}.key")
        if not key or len(key) > MAX_KEY_LENGTH:
            raise InvalidRequest(f"items.{i}.key must be 1 to {MAX_KEY_LENGTH} characters")
        keys.append(key)
        texts.append(_string(item["text"], f"items.{i}.text"))
    checked = _checked_texts(texts, truncate, config, request_limits, "items")
    return DeferredRequest(keys=keys, texts=[str(t) for t in checked], config=config)


def _deadline(headers: Mapping[str, Any] | None) -> float | None:
    if not headers or DEADLINE_HEADER not in headers:
        return None
    value = headers[DEADLINE_HEADER]
    if isinstance(value, bytes | bytearray):
        value = value.decode("ascii", "replace")
    if isinstance(value, bool):
        raise InvalidRequest(f"header {DEADLINE_HEADER} must be Unix epoch milliseconds")
    try:
        millis = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"header {DEADLINE_HEADER} must be Unix epoch milliseconds") from None
    if not math.isfinite(millis):
        raise InvalidRequest(f"header {DEADLINE_HEADER} must be Unix epoch milliseconds")
    return millis / 1000.0


# ---------------------------------------------------------------- replies
@dataclass(frozen=True, slots=True)
class Reply:
    body: bytes
    content_type: str = JSON_CONTENT_TYPE
    headers: dict[str, Any] | None = None


def encode_vectors(
    vectors: FloatArray | Sequence[Vector], model: str, encoding: str = "json", *, dimensions: int | None = None
) -> Reply:
    """The success reply: a (count, dimensions) array, or one vector per input (``dimensions`` then says their
    size). JSON: orjson writes float32 arrays directly (shortest round-trip repr), and a ``JsonVector`` goes in as
    the API wrote it, unparsed (the same numbers; see ``vectors.JsonVector``)."""
    if not isinstance(vectors, np.ndarray):
        if encoding == "json" and any(isinstance(v, JsonVector) for v in vectors):
            return _spliced_reply(vectors, model, dimensions)
        vectors = np.stack([as_array(v) for v in vectors]) if vectors else np.empty((0, dimensions or 0), np.float32)
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


def _spliced_reply(vectors: Sequence[Vector], model: str, dimensions: int | None) -> Reply:
    """The JSON success reply, each vector's JSON joined in: the bytes orjson writes for the same numbers, but for
    how each number is spelt."""
    if dimensions is None:
        raise ValueError("encode_vectors needs dimensions for vectors as the API wrote them")
    numpy = orjson.OPT_SERIALIZE_NUMPY
    texts = [v.text if isinstance(v, JsonVector) else orjson.dumps(v, option=numpy) for v in vectors]
    tail = b'],"model":' + orjson.dumps(model) + b',"dimensions":' + str(dimensions).encode() + b"}"
    return Reply(b'{"embeddings":[' + b",".join(texts) + tail)


# What orjson writes for one float32 in [-1, 1] (a unit vector's component) takes at most 16 characters, e.g.
# "-0.0000076293945": measured over every float32 in [-1, 1]. Typical components of a unit vector take 11 or 12.
_MAX_NUMBER_CHARS = 16
# Bytes of a success reply besides its vectors: '{"embeddings":[],"model":"","dimensions":3072}' is 46, and the
# float32 reply's headers about as many, plus a model name of at most 100 characters that JSON writes as they are
# (settings.MODEL_NAME).
_ENVELOPE_BYTES = 160


def reply_bytes(count: int, dimensions: int, encoding: str) -> int:
    """An upper bound of the size of the success reply ``encode_vectors`` builds for ``count`` vectors of
    ``dimensions`` components in [-1, 1], known before any vector is. float32: the body's exact size and an allowance
    for the headers; JSON: safe for any such vectors, and about a third above what typical unit vectors take."""
    if encoding == "float32":
        return count * dimensions * 4 + _ENVELOPE_BYTES
    if encoding == "json":
        # each number and the comma or bracket after it, and each vector's "[" and the comma after it
        return count * (dimensions * (_MAX_NUMBER_CHARS + 1) + 2) + _ENVELOPE_BYTES
    raise ValueError(f"reply encoding must be one of {_ENCODINGS}, got {encoding!r}")


ERROR_REPLY_MAX_BYTES = 4096  # every error reply is smaller
# Characters of an error message its reply keeps: JSON writes one in at most 6 bytes ("\u001f"), so 600 of them
# and the envelope stay under ERROR_REPLY_MAX_BYTES.
_MAX_ERROR_CHARS = 600


def encode_error(error: EmbedError) -> Reply:
    """The error reply; the message cut to ``_MAX_ERROR_CHARS`` characters, lone surrogates written out as escapes
    (orjson refuses them, and an error must always have its reply)."""
    message = error.message.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(message) > _MAX_ERROR_CHARS:
        message = message[: _MAX_ERROR_CHARS - 3] + "..."
    return Reply(orjson.dumps({"error": {"code": str(error.code), "message": message, "retryable": error.retryable}}))


def encode_flush_reply(written: int) -> Reply:
    return Reply(orjson.dumps({"flushed": written}))


# ---------------------------------------------------------------- the caller's side
FLUSH_REQUEST = b"{}"


def encode_request(
    texts: Sequence[str],
    *,
    model: str | None = None,
    task_type: str | None = None,
    output_dimensionality: int | None = None,
    reply_encoding: str = "json",
) -> bytes:
    body: dict[str, Any] = {"texts": list(texts), **_options(model, task_type, output_dimensionality)}
    if reply_encoding != "json":
        body["reply_encoding"] = reply_encoding
    return orjson.dumps(body)


def encode_deferred_items(
    items: Sequence[tuple[str, str]],
    *,
    model: str | None = None,
    task_type: str | None = None,
    output_dimensionality: int | None = None,
) -> bytes:
    """A message for the fire-and-forget lane: ``(key, text)`` pairs sharing one configuration."""
    body = {"items": [{"key": k, "text": t} for k, t in items], **_options(model, task_type, output_dimensionality)}
    return orjson.dumps(body)


def encode_deferred_in(items: Sequence[tuple[str, str]], config: EmbedConfig) -> bytes:
    """``encode_deferred_items`` in ``config``: how the worker sends items back to its own deferred lane."""
    return encode_deferred_items(
        items, model=config.model, task_type=config.task_type, output_dimensionality=config.output_dimensionality
    )


def _options(model: str | None, task_type: str | None, output_dimensionality: int | None) -> dict[str, Any]:
    """The optional configuration fields of a request, only those given."""
    options = {"model": model, "task_type": task_type, "output_dimensionality": output_dimensionality}
    return {name: value for name, value in options.items() if value}


class ErrorReply(Exception):
    """The worker answered with an error reply."""

    def __init__(self, code: str, message: str, retryable: bool):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


class MalformedReply(ValueError):
    """A reply that does not follow the wire contract."""


def decode_reply(
    body: bytes, content_type: str | None, headers: Mapping[str, Any] | None, *, count: int | None = None
) -> FloatArray:
    """The (count, dimensions) float32 vectors of a reply; raises ErrorReply or MalformedReply.
    With ``count``, a reply holding another number of vectors is malformed."""
    try:
        if content_type == FLOAT32_CONTENT_TYPE:
            h = headers or {}
            vectors = np.frombuffer(body, dtype="<f4").reshape(int(h["x-count"]), int(h["x-dimensions"]))
        else:
            reply = _object(body)
            if "error" in reply:
                raise _error(reply)
            vectors = np.asarray(reply["embeddings"], dtype=np.float32)
            if vectors.ndim != 2:
                raise MalformedReply(f"embeddings must be a list of vectors, got shape {vectors.shape}")
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, MalformedReply):
            raise
        raise MalformedReply(f"reply does not follow the wire contract: {type(exc).__name__}: {exc}") from None
    if count is not None and len(vectors) != count:
        raise MalformedReply(f"reply holds {len(vectors)} vectors for {count} texts")
    return vectors


def decode_flush_reply(body: bytes) -> int:
    """Vectors written by the answering worker's flush; raises ErrorReply or MalformedReply."""
    try:
        reply = _object(body)
        if "error" in reply:
            raise _error(reply)
        return int(reply["flushed"])
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, MalformedReply):
            raise
        raise MalformedReply(f"flush reply does not follow the wire contract: {type(exc).__name__}") from None


def _object(body: bytes) -> dict[str, Any]:
    reply = orjson.loads(body)
    if not isinstance(reply, dict):
        raise MalformedReply(f"reply must be a JSON object, got {type(reply).__name__}")
    return reply


def _error(reply: dict[str, Any]) -> ErrorReply:
    err = reply["error"]
    if not isinstance(err, dict) or not isinstance(err.get("code"), str):
        raise MalformedReply("error reply without a code")
    return ErrorReply(err["code"], str(err.get("message", "")), bool(err.get("retryable")))
