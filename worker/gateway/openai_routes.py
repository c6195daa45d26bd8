"""OpenAI's ``POST /v1/embeddings``: what the ``openai`` SDK (and LangChain's ``OpenAIEmbeddings``, LlamaIndex...)
sends, and answers and errors in OpenAI's shapes.

- ``input``: a string or a list of strings. Token arrays (lists of integers, which LangChain sends by default after
  counting tokens with tiktoken) are refused: Gemini takes text.
- ``model``: a Gemini model the workers serve (unknown: 404, as OpenAI answers for a model that does not exist).
- ``dimensions`` -> the worker's ``output_dimensionality``; ``encoding_format``: ``float`` (the API's default) or
  ``base64``, the little-endian float32 bytes the SDK asks for when the caller did not choose.
- ``user``: logged (escaped), not sent on.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import orjson

from worker import limits
from worker.gateway.calls import Failure, Job, bad_request, unknown_model
from worker.vectors import FloatArray

PATH = "/v1/embeddings"
_FIELDS = frozenset({"input", "model", "dimensions", "encoding_format", "user"})
_ENCODINGS = ("float", "base64")
TOKEN_ARRAYS = (
    "input: token arrays are not accepted, only text (a string or a list of strings): Gemini embeds text. "
    "LangChain's OpenAIEmbeddings sends token arrays unless made with check_embedding_ctx_length=False"
)
# OpenAI's error ``type`` by status (its API reference, "Error codes").
_TYPES = {401: "invalid_request_error", 429: "requests"}


@dataclass(frozen=True, slots=True)
class Parsed:
    job: Job
    encoding: str
    user: str | None


def parse(body: bytes, *, models: frozenset[str], lane: str, timeout: float) -> Parsed:
    """The request, checked; raises ``Failure`` (400, or 404 for a model the workers do not serve)."""
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(raw, dict):
        raise bad_request("the request body must be a JSON object")
    if unknown := sorted(set(raw) - _FIELDS):
        raise bad_request(f"Unrecognized request argument supplied: {str(unknown[0])[:60]}", unknown[0][:60])
    model = raw.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter (a Gemini embedding model)", "model")
    if model not in models:
        raise unknown_model(model, models)
    texts = _texts(raw.get("input"))
    dims = raw.get("dimensions")
    if dims is not None and (not isinstance(dims, int) or isinstance(dims, bool)):
        raise bad_request("dimensions must be an integer", "dimensions")
    encoding = raw.get("encoding_format") or "float"
    if encoding not in _ENCODINGS:
        raise bad_request(f"encoding_format must be 'float' or 'base64', not {str(encoding)[:40]!r}", "encoding_format")
    user = raw.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("user must be a string", "user")
    request: dict[str, Any] = {"texts": texts, "model": model, "reply_encoding": "float32"}
    if dims is not None:
        request["output_dimensionality"] = dims
    tokens = sum(limits.estimate_tokens(text) for text in texts)
    job = Job(orjson.dumps(request), len(texts), model, tokens, lane=lane, timeout=timeout)
    return Parsed(job, encoding, user)


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise bad_request("input must be a string or a non-empty list of strings", "input")
    if all(isinstance(item, str) for item in value):
        return value
    if all(isinstance(item, int | list) for item in value):
        raise bad_request(TOKEN_ARRAYS, "input")
    raise bad_request("input must be a string or a list of strings", "input")


def render(vectors: FloatArray, parsed: Parsed) -> bytes:
    """OpenAI's answer. ``base64``: each row's bytes as they came from the worker (little-endian float32)."""
    job = parsed.job
    if parsed.encoding == "base64":
        rows: list[Any] = [base64.b64encode(row.astype("<f4", copy=False).tobytes()).decode() for row in vectors]
    else:
        rows = list(vectors)
    data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)]
    answer = {
        "object": "list",
        "data": data,
        "model": job.model,
        "usage": {"prompt_tokens": job.tokens, "total_tokens": job.tokens},
    }
    return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)


def error_body(failure: Failure) -> bytes:
    """``{"error": {"message", "type", "param", "code"}}``, as OpenAI writes errors."""
    kind = _TYPES.get(failure.status, "server_error" if failure.status >= 500 else "invalid_request_error")
    error = {"message": failure.message, "type": kind, "param": failure.param, "code": failure.code}
    return orjson.dumps({"error": error})


def auth_failure(given: bool) -> Failure:
    if not given:
        return Failure(
            401,
            "invalid_api_key",
            "You didn't provide an API key. You need to provide your API key in an Authorization header using "
            "Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )
    return Failure(401, "invalid_api_key", "Incorrect API key provided.")


def api_key(headers: Any) -> str | None:
    """The key of ``Authorization: Bearer KEY``, or None."""
    value = headers.get("Authorization")
    if not isinstance(value, str):
        return None
    scheme, _, key = value.strip().partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None
