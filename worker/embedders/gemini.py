"""Gemini embeddings through google-genai's async client, with SDK errors mapped to ours.

The transport is chosen explicitly: we hand the SDK our own ``httpx.AsyncClient``. Otherwise, when
aiohttp happens to be importable, the SDK's async path switches to aiohttp, which retries
connection errors on its own and would hide them from our retry budget and metrics.
The SDK itself does not retry by default (``HttpOptions.retry_options`` is unset), which we keep:
retries, backoff and rate limiting live in ``worker.upstream``.

Two call paths, same endpoint, same URL, headers and error type (the SDK's ``APIError``), and the same request:
both send what ``embedders.request.build_request`` built (so does the Batch API path, ``gemini_batch.py``).
- ``fast_path=True`` (default) posts the request's ``batchEmbedContents`` body (orjson) through our httpx
  client to the URL the SDK would use, with the SDK's own headers (API key, client identification), worked out
  as the SDK does (``sdk_route``) and checked against its client once that is loaded: no call waits for
  google-genai's import (~0.5 s of CPU, most of a start); a non-200 answer goes through the SDK's
  ``APIError.raise_for_async_response`` (the first one imports the SDK).
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

import importlib.metadata
import logging
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import orjson
from pydantic import SecretStr

from worker import limits, tracing
from worker.embedders.request import EmbedRequest, build_request
from worker.embedders.response import read_embeddings
from worker.errors import CredentialError, RateLimited, UpstreamError, UpstreamInvalidInput
from worker.inputs import EmbedInput
from worker.messages import EmbedConfig
from worker.vectors import FloatArray, JsonVector, normalise

if TYPE_CHECKING:
    from google import genai
    from google.genai import errors as genai_errors

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
        self._api_key, self._base_url, self._timeout_s = api_key, base_url, timeout_s
        self._client: genai.Client | None = None
        # The fast path's route is worked out here, as the SDK would (``sdk_route``), so that the fast path needs
        # no SDK until an error answer: importing google-genai costs ~0.5 s of CPU, most of a start, and on a
        # thread it would still hold the GIL for that long (measured: calls a rate limit admitted went out late
        # and bunched). Once the SDK is loaded (``client``), its own route replaces this one if they differ;
        # tests/unit/test_sdk_route.py checks that they do not.
        self._route = sdk_route(api_key, base_url) if fast_path else None
        self.fast_path = self._route is not None

    @property
    def client(self) -> genai.Client:
        """The SDK's client (built on first use): the public method's path and the Batch API's (gemini_batch.py)."""
        if self._client is None:
            from google import genai
            from google.genai import types

            options = types.HttpOptions(
                base_url=self._base_url,
                timeout=int(self._timeout_s * 1000),  # the SDK takes milliseconds
                httpx_async_client=self._http,
            )
            self._client = genai.Client(api_key=self._api_key.get_secret_value(), http_options=options)
            route = _fast_route(self._client)
            if self._route is not None and route is not None and route != self._route:
                log.warning("the SDK's own route differs from the one worked out for it; using the SDK's")
                self._route = route
        return self._client

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
        from google.genai import errors as genai_errors

        contents: list[Any] = request.sdk_contents()  # one Content per input (see embedders/request.py)
        try:
            response = await self.client.aio.models.embed_content(
                model=request.model, contents=contents, config=request.sdk_config()
            )
        except genai_errors.APIError as exc:
            raise map_api_error(exc) from None
        return np.array([e.values for e in response.embeddings or []], dtype=np.float32)

    async def _embed_fast(
        self, request: EmbedRequest, count: int, dimensions: int, *, splice: bool
    ) -> FloatArray | list[JsonVector]:
        """POST {base}/{version}/models/{model}:batchEmbedContents, as the SDK's public method does."""
        assert self._route is not None
        base, headers = self._route
        body = orjson.dumps({"requests": request.rest_requests()})
        url = f"{base}models/{request.model}:batchEmbedContents"
        with tracing.client_span("POST", url) as span:  # a child of the call span; a no-op while off
            response = await self._http.post(url, content=body, headers=headers)
            span.set_status_code(response.status_code)
        if response.status_code != 200:
            await _raise_for(response)
        return read_embeddings(response.content, count, dimensions, splice=splice)

    async def aclose(self) -> None:
        await self._http.aclose()


async def _raise_for(response: httpx.Response) -> None:
    """A non-200 answer, raised as the SDK would raise it (its ``APIError``, the details it parses), then mapped to
    our error kinds. The first one imports the SDK (once, ~0.5 s: the price of a start without it)."""
    from google.genai import errors as genai_errors

    try:
        await genai_errors.APIError.raise_for_async_response(response)
    except genai_errors.APIError as exc:
        raise map_api_error(exc) from None
    raise UpstreamError(f"Gemini API {response.status_code}: not an error the SDK knows", retry_now=False)


def sdk_route(api_key: SecretStr, base_url: str | None) -> tuple[str, dict[str, str]]:
    """The base URL (with the API version) and headers google-genai's client sends for an API key, worked out
    without importing it (``_fast_route`` reads them off a client; the two are compared at run time and in
    tests/unit/test_sdk_route.py): its default endpoint and API version, the key, and its client identification
    (``_api_client._append_library_version_headers``)."""
    label = f"google-genai-sdk/{importlib.metadata.version('google-genai')} gl-python/{sys.version.split()[0]}"
    headers = {
        "Content-Type": "application/json",
        "x-goog-api-key": api_key.get_secret_value(),
        "user-agent": label,
        "x-goog-api-client": label,
    }
    base = (base_url or SDK_BASE_URL).rstrip("/")
    return f"{base}/{SDK_API_VERSION}/", headers


SDK_BASE_URL = "https://generativelanguage.googleapis.com/"  # google-genai's default for an API key
SDK_API_VERSION = "v1"  # google-genai's default API version (3.x; checked against the installed SDK in tests)


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
