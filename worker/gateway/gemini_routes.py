"""Gemini's ``POST /{version}/models/{model}:batchEmbedContents`` and ``:embedContent``, as google-genai calls them
(``genai.Client(api_key=KEY, http_options=HttpOptions(base_url=GATEWAY))``), bodies, answers and errors in the
API's own shapes.

Each request of a batch carries its ``content`` (its parts yield one vector, as at the API), and they go to the
worker as its ``inputs``. A content of one text part goes as a text for a model that takes ``taskType``
(gemini-embedding-001), so it shares the worker's batches and cache with every other text; for a model whose task
goes into the prompt (gemini-embedding-2) parts go as they are, with no instruction added, as the API would embed
them. One HTTP request is one worker request, which has one configuration: a batch whose requests differ in
``taskType`` or ``outputDimensionality`` is refused (400) rather than split. ``title`` is refused too: the worker's
wire format has no place for it, and dropping it would change the vectors silently.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from worker import limits
from worker.gateway.calls import Failure, Job, bad_request
from worker.vectors import FloatArray

PATH = re.compile(r"^/(?P<version>v1[a-z0-9]*)/models/(?P<model>[^/:]+):(?P<method>batchEmbedContents|embedContent)$")
# google.rpc status names by HTTP status, as the API writes them in errors (the emulator plays the same).
STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    408: "DEADLINE_EXCEEDED",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
INVALID_KEY = "API key not valid. Please pass a valid API key."
NO_KEY = (
    "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other "
    "form of API consumer identity to call this API."
)
_REQUEST_FIELDS = frozenset(
    {"model", "content", "taskType", "task_type", "outputDimensionality", "output_dimensionality", "title"}
)


def parse(body: bytes, *, model: str, method: str, models: frozenset[str], lane: str, timeout: float) -> Job:
    """The request of ``method`` for ``model`` (from the URL), checked; raises ``Failure``."""
    if model not in models:
        raise Failure(404, "model_not_found", f"models/{model[:100]} is not found for API version v1beta")
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"Invalid JSON payload received: {exc}") from None
    if not isinstance(raw, dict):
        raise bad_request("Invalid JSON payload received: the body must be an object")
    requests = [raw] if method == "embedContent" else raw.get("requests")
    if not isinstance(requests, list) or not requests or (method != "embedContent" and set(raw) - {"requests"}):
        raise bad_request('the body must be {"requests": [...]}, a non-empty list')
    config: tuple[Any, Any] | None = None
    inputs, texts = [], []
    for i, request in enumerate(requests):
        where = f"requests[{i}]"
        if not isinstance(request, dict) or (unknown := set(request) - _REQUEST_FIELDS):
            raise bad_request(f"{where}: unknown field {sorted(unknown)[0] if isinstance(request, dict) else ''}")
        if request.get("title") is not None:
            raise bad_request(f"{where}.title is not supported by this gateway (the workers take none)")
        named = request.get("model", f"models/{model}")
        if named not in (model, f"models/{model}"):
            raise bad_request(f"{where}.model does not match the URL")
        this = (
            _either(request, "taskType", "task_type"),
            _either(request, "outputDimensionality", "output_dimensionality"),
        )
        if config is not None and this != config:
            raise bad_request(
                f"{where}: every request of one call must have the same taskType and outputDimensionality here"
            )
        config = this
        item, text = _input(request.get("content"), where, model)
        inputs.append(item)
        texts.append(text)
    task_type, dims = config or (None, None)
    wire: dict[str, Any] = {"inputs": inputs, "model": model, "reply_encoding": "float32"}
    if task_type is not None:
        wire["task_type"] = task_type
    if dims is not None:
        wire["output_dimensionality"] = dims
    tokens = sum(limits.estimate_tokens(text) for text in texts)
    return Job(orjson.dumps(wire), len(inputs), model, tokens, lane=lane, timeout=timeout)


def _either(request: dict[str, Any], camel: str, snake: str) -> Any:
    """A field in the REST API's lowerCamelCase or its proto name (protobuf's JSON parser takes both)."""
    return request.get(camel, request.get(snake))


def _input(content: Any, where: str, model: str) -> tuple[dict[str, Any], str]:
    """One worker input (``{"text": ...}`` or ``{"parts": [...]}``) and its text, for the token estimate."""
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list) or not parts:
        raise bad_request(f"{where}.content must have a non-empty list of parts")
    wire = [_part(part, f"{where}.content.parts[{j}]") for j, part in enumerate(parts)]
    text = "".join(part.get("text", "") for part in wire)
    if len(wire) == 1 and "text" in wire[0] and not limits.model(model).task_in_prompt:
        return {"text": wire[0]["text"]}, text
    return {"parts": wire}, text


def _part(part: Any, where: str) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise bad_request(f"{where} must be an object")
    if isinstance(part.get("text"), str) and len(part) == 1:
        return {"text": part["text"]}
    inline = part.get("inlineData", part.get("inline_data"))
    ref = part.get("fileData", part.get("file_data"))
    if len(part) == 1 and isinstance(inline, dict):
        data = inline.get("data")
        if not isinstance(data, str):
            raise bad_request(f"{where}.inlineData.data must be base64")
        return {"inline_data": {"mime_type": _mime(inline, where), "data": _standard_base64(data)}}
    if len(part) == 1 and isinstance(ref, dict):
        uri = ref.get("fileUri", ref.get("file_uri"))
        if not isinstance(uri, str):
            raise bad_request(f"{where}.fileData.fileUri must be a string")
        return {"file_data": {"mime_type": _mime(ref, where), "file_uri": uri}}
    raise bad_request(f"{where}: a part must have exactly one of text, inlineData or fileData")


def _mime(blob: dict[str, Any], where: str) -> str:
    mime = blob.get("mimeType", blob.get("mime_type"))
    if not isinstance(mime, str):
        raise bad_request(f"{where}: mimeType must be a string")
    return mime


def _standard_base64(data: str) -> str:
    """A protobuf ``bytes`` field may come URL-safe and unpadded (google-genai sends URL-safe); the worker reads
    standard, padded base64."""
    data = data.replace("-", "+").replace("_", "/")
    return data + "=" * (-len(data) % 4)


def render(vectors: FloatArray, method: str) -> bytes:
    """``{"embeddings": [{"values": [...]}, ...]}``, or ``{"embedding": {"values": [...]}}`` for embedContent."""
    if method == "embedContent":
        return orjson.dumps({"embedding": {"values": vectors[0]}}, option=orjson.OPT_SERIALIZE_NUMPY)
    return orjson.dumps({"embeddings": [{"values": row} for row in vectors]}, option=orjson.OPT_SERIALIZE_NUMPY)


def error_body(failure: Failure) -> bytes:
    """``{"error": {"code", "message", "status", "details"}}``, as the API (and the emulator) writes errors."""
    error: dict[str, Any] = {
        "code": failure.status,
        "message": failure.message,
        "status": STATUS_NAMES.get(failure.status, "UNKNOWN"),
    }
    details = []
    if failure.code == "invalid_api_key":
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
            }
        )
    if failure.retry_after is not None:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{failure.retry_after}s"})
    if details:
        error["details"] = details
    return orjson.dumps({"error": error})


def auth_failure(given: bool) -> Failure:
    """What the API answers: 403 for no key at all, 400 ``API_KEY_INVALID`` for a wrong one (not 401)."""
    if not given:
        return Failure(403, "no_api_key", NO_KEY)
    return Failure(400, "invalid_api_key", INVALID_KEY)


def api_key(headers: Any, query: Any) -> str | None:
    """``x-goog-api-key``, else ``?key=``."""
    key = headers.get("x-goog-api-key") or query.get("key")
    return key if isinstance(key, str) and key else None
