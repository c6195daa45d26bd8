"""Gemini embeddings through google-genai's async client, with SDK errors mapped to ours.

The transport is chosen explicitly: we hand the SDK our own ``httpx.AsyncClient``. Otherwise, when
aiohttp happens to be importable, the SDK's async path switches to aiohttp, which retries
connection errors on its own and would hide them from our retry budget and metrics.
The SDK itself does not retry by default (``HttpOptions.retry_options`` is unset), which we keep:
retries, backoff and rate limiting live in ``worker.upstream``.

Two call paths, same endpoint, same SDK transport, headers and error mapping (``APIError``):
- ``fast_path=True`` (default) builds the ``batchEmbedContents`` body itself and sends it through the
  SDK's own API client (``client.aio._api_client.async_request``), then parses the raw response with
  orjson straight into one float32 array. Profiling showed why: at 3,072 dimensions the public
  method's stdlib-json parse plus a pydantic object per vector costs ~180 ms per 100 vectors, and at
  8 dimensions its per-text request models were ~10% of the worker's CPU (README, Performance).
- ``fast_path=False`` calls the public ``client.aio.models.embed_content``. It is also used when the
  installed SDK lacks the private client the fast path needs. Tests run both against the emulator.
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
from worker.errors import RateLimited, UpstreamError, UpstreamInvalidInput
from worker.messages import EmbedConfig, Vectors
from worker.vectors import normalise

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
    ):
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        options = types.HttpOptions(
            base_url=base_url,
            timeout=int(timeout_s * 1000),  # the SDK takes milliseconds
            httpx_async_client=self._http,
        )
        self._client = genai.Client(api_key=api_key.get_secret_value(), http_options=options)
        self.client = self._client  # shared with the Batch API path (embedders/gemini_batch.py)
        self._api_client = getattr(self._client.aio, "_api_client", None) if fast_path else None
        self.fast_path = self._api_client is not None and hasattr(self._api_client, "async_request")

    async def embed(self, texts: Sequence[str], config: EmbedConfig) -> Vectors:
        if len(texts) > limits.MAX_TEXTS_PER_CALL:
            raise ValueError(f"{len(texts)} texts in one call; the API takes {limits.MAX_TEXTS_PER_CALL}")
        try:
            if self.fast_path:
                vectors = await self._embed_fast(texts, config)
            else:
                vectors = await self._embed_public(texts, config)
        except genai_errors.APIError as exc:
            raise map_api_error(exc) from None
        except httpx.TimeoutException as exc:
            raise UpstreamError(f"timed out: {type(exc).__name__}", transient=True) from None
        except httpx.TransportError as exc:
            raise UpstreamError(f"connection error: {type(exc).__name__}", transient=True) from None
        except (KeyError, TypeError, ValueError) as exc:  # a 200 whose body is not what the API documents
            raise UpstreamError(f"malformed API response: {type(exc).__name__}", transient=True) from None

        if vectors.ndim != 2 or vectors.shape != (len(texts), config.dimensions):
            raise UpstreamError(
                f"API returned vectors of shape {vectors.shape} for {len(texts)} texts", transient=False
            )
        if config.dimensions < limits.full_dimensions(config.model):
            normalise(vectors)
        return vectors

    async def _embed_public(self, texts: Sequence[str], config: EmbedConfig) -> Vectors:
        embed_config = types.EmbedContentConfig(
            task_type=config.task_type, output_dimensionality=config.output_dimensionality
        )
        contents: list[Any] = list(texts)  # one text per content; the SDK batches them in one call
        response = await self._client.aio.models.embed_content(
            model=config.model, contents=contents, config=embed_config
        )
        return np.array([e.values for e in response.embeddings or []], dtype=np.float32)

    async def _embed_fast(self, texts: Sequence[str], config: EmbedConfig) -> Vectors:
        """POST {base}/{version}/models/{model}:batchEmbedContents, as the SDK's public method does."""
        assert self._api_client is not None
        model = f"models/{config.model}"
        extra: dict[str, Any] = {}
        if config.task_type:
            extra["taskType"] = config.task_type
        if config.output_dimensionality:
            extra["outputDimensionality"] = config.output_dimensionality
        body = {"requests": [{"model": model, "content": {"parts": [{"text": t}]}, **extra} for t in texts]}
        response = await self._api_client.async_request("post", f"{model}:batchEmbedContents", body)
        parsed = orjson.loads(response.body)
        embeddings = parsed.get("embeddings") or []
        return np.array([e["values"] for e in embeddings], dtype=np.float32)

    async def aclose(self) -> None:
        await self._http.aclose()


def map_api_error(exc: genai_errors.APIError) -> UpstreamError:
    """Translate the SDK's error into our error kinds (message kept short and key-free)."""
    code = int(exc.code or 0)
    message = f"Gemini API {code} {exc.status or ''}: {(exc.message or '')[:300]}".strip()
    details = _details(exc.details)
    if code == 429:
        return RateLimited(message, retry_after=_retry_delay(details), daily=_is_daily_quota(details))
    if code == 400:
        return UpstreamInvalidInput(message)
    if code in (408, 409) or code >= 500:
        return UpstreamError(message, status=code, transient=True, retry_after=_retry_delay(details))
    if code in (401, 403):
        # The key, not the request: retrying now will not help, but the request is good once an operator
        # fixes the key, so it is parked for replay (retryable) and counts towards pausing consumption.
        error = UpstreamError(message, status=code, transient=False)
        error.retryable = True
        return error
    # 404 (unknown model) and the like: the request cannot succeed as sent.
    return UpstreamError(message, status=code, transient=False)


def _details(body: Any) -> list[dict[str, Any]]:
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("details"), list):
            return [d for d in inner["details"] if isinstance(d, dict)]
    return []


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
