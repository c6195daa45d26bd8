"""Gemini embeddings through google-genai's async client, with SDK errors mapped to ours.

The transport is chosen explicitly: we hand the SDK our own ``httpx.AsyncClient``. Otherwise, when
aiohttp happens to be importable, the SDK's async path switches to aiohttp, which retries
connection errors on its own and would hide them from our retry budget and metrics.
The SDK itself does not retry by default (``HttpOptions.retry_options`` is unset), which we keep:
retries, backoff and rate limiting live in ``worker.upstream``.

Two call paths, same endpoint, same URL, headers and error type (the SDK's ``APIError``), and the same request:
both send what ``embedders.request.build_request`` built (so does the Batch API path, ``gemini_batch.py``).
- ``fast_path=True`` (default) posts the request's ``batchEmbedContents`` body (orjson) through our httpx
  client to the URL the SDK would use, with the SDK's own headers (API key, client identification), reading
  both from the SDK's client; a non-200 answer goes through the SDK's ``APIError.raise_for_async_response``.
  The response is read by ``embedders.response.read_embeddings``: at full size its vectors are cut out unparsed,
  below it they are parsed with orjson straight into one float32 array. Measured why: the public method's
  stdlib-json parse plus a pydantic object per vector costs ~180 ms per 100 vectors at 3,072 dimensions, its
  per-text request models were ~10% of the worker's CPU at 8 dimensions, and even the SDK's ``async_request``
  (retry wrapper, request objects) costs ~1.0 ms of CPU per call more than the post itself (3.5 against 2.5 ms
  per 100-text call against the emulator).
- ``fast_path=False`` calls the public ``client.aio.models.embed_content``. It is also used when the
  installed SDK lacks the client attributes the fast path reads. Tests run both against the emulator.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np
import orjson
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from pydantic import SecretStr

from worker import limits
from worker.embedders.request import EmbedRequest, build_request
from worker.embedders.response import read_embeddings
from worker.errors import CredentialError, RateLimited, UpstreamError, UpstreamInvalidInput
from worker.inputs import EmbedInput
from worker.messages import EmbedConfig
from worker.vectors import FloatArray, JsonVector, normalise

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


class GeminiEmbedder:
    def __init__(
        self,
        *,
        api_key: SecretStr,
        base_url: str | None = None,
        timeout_s: float = 30.0,
        max_connections: int = 32,
        fast_path: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,  # httpx's seam, for tests that look at the wire
    ):
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )
        options = types.HttpOptions(
            base_url=base_url,
            timeout=int(timeout_s * 1000),  # the SDK takes milliseconds
            httpx_async_client=self._http,
        )
        self._client = genai.Client(api_key=api_key.get_secret_value(), http_options=options)
        self.client = self._client  # shared with the Batch API path (embedders/gemini_batch.py)
        self._route = _fast_route(self._client) if fast_path else None
        self.fast_path = self._route is not None

    async def call(self, texts: Sequence[EmbedInput], config: EmbedConfig) -> FloatArray | list[JsonVector]:
        """One API call; raises ``UpstreamError`` (or a subclass). Full-size vectors come back as the API wrote
        them when the response passes ``response.splice_embeddings``' scan, else parsed."""
        if len(texts) > limits.MAX_TEXTS_PER_CALL:
            raise ValueError(f"{len(texts)} inputs in one call; the API takes {limits.MAX_TEXTS_PER_CALL}")
        request = build_request(config, texts)
        full = config.dimensions >= limits.full_dimensions(config.model)
        try:
            if self.fast_path:
                vectors = await self._embed_fast(request, len(texts), config.dimensions, splice=full)
                if isinstance(vectors, list):  # spliced: the scan checked their count and size
                    return vectors
            else:
                vectors = await self._embed_public(request)
        except genai_errors.APIError as exc:
            raise map_api_error(exc) from None
        except httpx.TimeoutException as exc:
            raise UpstreamError(f"timed out: {type(exc).__name__}", retry_now=True) from None
        except httpx.TransportError as exc:
            raise UpstreamError(f"connection error: {type(exc).__name__}", retry_now=True) from None
        except (KeyError, TypeError, ValueError) as exc:  # a 200 whose body is not what the API documents
            raise UpstreamError(f"malformed API response: {type(exc).__name__}", retry_now=True) from None

        if vectors.ndim != 2 or vectors.shape != (len(texts), config.dimensions):
            raise UpstreamError(
                f"API returned vectors of shape {vectors.shape} for {len(texts)} inputs", retry_now=False
            )
        if not full:
            normalise(vectors)
        return vectors

    async def _embed_public(self, request: EmbedRequest) -> FloatArray:
        contents: list[Any] = request.sdk_contents()  # one Content per input (see embedders/request.py)
        response = await self._client.aio.models.embed_content(
            model=request.model, contents=contents, config=request.sdk_config()
        )
        return np.array([e.values for e in response.embeddings or []], dtype=np.float32)

    async def _embed_fast(
        self, request: EmbedRequest, count: int, dimensions: int, *, splice: bool
    ) -> FloatArray | list[JsonVector]:
        """POST {base}/{version}/models/{model}:batchEmbedContents, as the SDK's public method does."""
        assert self._route is not None
        base, headers = self._route
        body = orjson.dumps({"requests": request.rest_requests()})
        response = await self._http.post(
            f"{base}models/{request.model}:batchEmbedContents", content=body, headers=headers
        )
        if response.status_code != 200:
            await genai_errors.APIError.raise_for_async_response(response)
        return read_embeddings(response.content, count, dimensions, splice=splice)

    async def aclose(self) -> None:
        await self._http.aclose()


def _fast_route(client: genai.Client) -> tuple[str, dict[str, str]] | None:
    """The base URL (with the API version) and the headers the SDK itself would send, read off its client; None
    when this SDK keeps them elsewhere (then the public path is used)."""
    options = getattr(getattr(client.aio, "_api_client", None), "_http_options", None)
    base_url, version = getattr(options, "base_url", None), getattr(options, "api_version", None)
    if not (isinstance(base_url, str) and isinstance(version, str)):
        return None
    headers = {str(k): str(v) for k, v in (getattr(options, "headers", None) or {}).items()}
    if not any(k.lower() == "x-goog-api-key" for k in headers):
        return None  # another kind of credentials (Vertex): let the SDK sign its own requests
    headers["Content-Type"] = "application/json"
    return f"{base_url.rstrip('/')}/{version}/", headers


# google.rpc.ErrorInfo reasons that blame the key or the project, never the input. Gemini answers a wrong key
# with HTTP 400 INVALID_ARGUMENT and reason API_KEY_INVALID, so the status alone cannot tell it from bad input.
CREDENTIAL_REASONS = frozenset(
    {
        "API_KEY_INVALID",
        "API_KEY_EXPIRED",
        "API_KEY_SERVICE_BLOCKED",
        "API_KEY_HTTP_REFERRER_BLOCKED",
        "API_KEY_IP_ADDRESS_BLOCKED",
        "API_KEY_ANDROID_APP_BLOCKED",
        "API_KEY_IOS_APP_BLOCKED",
        "ACCESS_TOKEN_EXPIRED",
        "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
        "SERVICE_DISABLED",
        "BILLING_DISABLED",
        "CONSUMER_INVALID",
    }
)


def map_api_error(exc: genai_errors.APIError) -> UpstreamError:
    """Translate the SDK's error into our error kinds (message kept short and key-free). The one place that
    decides what is a credential problem."""
    code = int(exc.code or 0)
    message = f"Gemini API {code} {exc.status or ''}: {(exc.message or '')[:300]}".strip()
    details = _details(exc.details)
    reason = _error_reason(details)
    if code == 429:
        return RateLimited(message, retry_after=_retry_delay(details), daily=_is_daily_quota(details))
    if (
        code in (401, 403)
        or reason in CREDENTIAL_REASONS
        # A 400 that is about the account, not the input: FAILED_PRECONDITION ("User location is not
        # supported"), or a key complaint whose ErrorInfo went missing.
        or (code == 400 and (exc.status == "FAILED_PRECONDITION" or (exc.message or "").startswith("API key")))
    ):
        return CredentialError(message, status=code, reason=reason)
    if code == 400:
        return UpstreamInvalidInput(message)
    if code in (408, 409) or code >= 500:
        return UpstreamError(message, status=code, retry_now=True, retry_after=_retry_delay(details))
    # 404 (unknown model) and the like: the request cannot succeed as sent.
    return UpstreamError(message, status=code, retry_now=False)


def _details(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("details"), list):
            return [d for d in inner["details"] if isinstance(d, dict)]
    return []


def _error_reason(details: list[dict[str, Any]]) -> str | None:
    """google.rpc.ErrorInfo's ``reason`` (API_KEY_INVALID, ...), if the error carries one."""
    for detail in details:
        if str(detail.get("@type", "")).endswith("google.rpc.ErrorInfo") and detail.get("reason"):
            return str(detail["reason"])
    return None


def _retry_delay(details: list[dict[str, Any]]) -> float | None:
    """google.rpc.RetryInfo's retryDelay, a protobuf Duration in JSON form such as "37s"."""
    for detail in details:
        if str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


def _is_daily_quota(details: list[dict[str, Any]]) -> bool:
    """A google.rpc.QuotaFailure whose violated quota is per day (quotaId ...PerDay...)."""
    for detail in details:
        if str(detail.get("@type", "")).endswith("google.rpc.QuotaFailure"):
            for violation in detail.get("violations") or []:
                if isinstance(violation, dict) and "perday" in str(violation.get("quotaId", "")).lower():
                    return True
    return False
