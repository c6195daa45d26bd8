"""The Gemini embedder through the real google-genai SDK against the emulator, on both call paths."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest
from pydantic import SecretStr

from worker.embedders.gemini import GeminiEmbedder
from worker.emulator import EmulatorState, EmulatorThread, Fault
from worker.errors import CredentialError, RateLimited, UpstreamError, UpstreamInvalidInput
from worker.messages import EmbedConfig
from worker.vectors import expected_vector, stack


@pytest.fixture(params=[True, False], ids=["fast-path", "public-method"])
async def embedder(request: pytest.FixtureRequest, emulator: EmulatorThread) -> AsyncIterator[GeminiEmbedder]:
    emb = GeminiEmbedder(api_key=SecretStr("k"), base_url=emulator.base_url, fast_path=request.param)
    assert emb.fast_path is request.param
    yield emb
    await emb.aclose()


@pytest.mark.parametrize(
    "config",
    [
        EmbedConfig("gemini-embedding-001"),
        EmbedConfig("gemini-embedding-001", "RETRIEVAL_QUERY", 768),
        EmbedConfig("text-embedding-004", "CLUSTERING", 128),
    ],
)
async def test_vectors_match_the_texts_and_are_unit_length(embedder: GeminiEmbedder, config: EmbedConfig) -> None:
    texts = [f"text {i}" for i in range(37)]
    got = await embedder.call(texts, config)
    full_size = config.output_dimensionality is None
    # At full size the fast path forwards the API's own numbers (embedders/response.py); every other way parses.
    assert isinstance(got, list) == (embedder.fast_path and full_size)
    vectors = stack(got)
    assert vectors.dtype == np.float32 and vectors.shape == (37, config.dimensions)
    full = 3072 if config.model == "gemini-embedding-001" else 768
    for text, vec in zip(texts, vectors, strict=True):
        want = expected_vector(
            text, model=config.model, task_type=config.task_type, dims=config.output_dimensionality, full_dims=full
        )
        assert np.allclose(vec, want, atol=1e-6)
        assert abs(float(np.linalg.norm(vec)) - 1) < 1e-5


async def test_errors_are_mapped(embedder: GeminiEmbedder, emulator_state: EmulatorState) -> None:
    cfg = EmbedConfig("gemini-embedding-001")
    emulator_state.faults = [
        Fault(429, retry_delay_s=7),
        Fault(429, daily=True),
        Fault(503),
        Fault(400),
        Fault(403),
    ]
    with pytest.raises(RateLimited) as limited:
        await embedder.call(["a"], cfg)
    assert limited.value.retry_after == 7 and limited.value.retry_now and not limited.value.daily
    with pytest.raises(RateLimited) as daily:
        await embedder.call(["a"], cfg)
    assert daily.value.daily and not daily.value.retry_now and daily.value.retryable
    with pytest.raises(UpstreamError) as unavailable:
        await embedder.call(["a"], cfg)
    assert unavailable.value.retry_now and unavailable.value.status == 503
    with pytest.raises(UpstreamInvalidInput):
        await embedder.call(["a"], cfg)
    with pytest.raises(CredentialError) as denied:
        await embedder.call(["a"], cfg)
    assert not denied.value.retry_now and denied.value.status == 403 and denied.value.retryable
    with pytest.raises(UpstreamError) as unknown:
        await embedder.call(["a"], EmbedConfig("no-such-model"))
    assert unknown.value.status == 404 and not unknown.value.retry_now and not unknown.value.retryable


async def test_a_wrong_key_is_a_credential_error_not_bad_input(
    emulator: EmulatorThread, emulator_state: EmulatorState
) -> None:
    """Gemini answers a wrong key with 400 INVALID_ARGUMENT; only its ErrorInfo reason tells it from bad input."""
    emulator_state.api_key = "the-right-key"
    emb = GeminiEmbedder(api_key=SecretStr("a-wrong-key"), base_url=emulator.base_url, timeout_s=5)
    try:
        with pytest.raises(CredentialError) as wrong:
            await emb.call(["a"], EmbedConfig("gemini-embedding-001"))
        assert wrong.value.status == 400 and wrong.value.reason == "API_KEY_INVALID" and wrong.value.retryable
        emulator_state.api_key = None
        emulator_state.faults = [
            Fault(400, reason="API_KEY_EXPIRED", message="API key expired. Please renew the API key."),
            Fault(400, message="Request contains an invalid argument."),
        ]
        with pytest.raises(CredentialError) as expired:
            await emb.call(["a"], EmbedConfig("gemini-embedding-001"))
        assert expired.value.reason == "API_KEY_EXPIRED"
        with pytest.raises(UpstreamInvalidInput):  # a 400 about the input stays bad input
            await emb.call(["a"], EmbedConfig("gemini-embedding-001"))
    finally:
        await emb.aclose()


async def test_connection_refused_is_transient() -> None:
    emb = GeminiEmbedder(api_key=SecretStr("k"), base_url="http://127.0.0.1:9", timeout_s=2)
    with pytest.raises(UpstreamError) as info:
        await emb.call(["a"], EmbedConfig("gemini-embedding-001"))
    assert info.value.retry_now
    await emb.aclose()


async def test_an_indented_response_as_the_real_api_writes_it_is_spliced_too(
    embedder: GeminiEmbedder, emulator_state: EmulatorState
) -> None:
    emulator_state.configure({"indent": True})
    texts = ["first", "second", "third"]
    config = EmbedConfig("gemini-embedding-001")
    got = await embedder.call(texts, config)
    assert isinstance(got, list) == embedder.fast_path
    for text, vec in zip(texts, stack(got), strict=True):
        want = expected_vector(text, model=config.model, task_type=None, dims=None, full_dims=3072)
        np.testing.assert_allclose(vec, want, atol=1e-6)  # want is renormalised: the last bit may differ


async def test_the_fast_path_answers_without_the_sdk(emulator: EmulatorThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """No call waits for google-genai (its import is most of a start): with the SDK unimportable, calls still work;
    the SDK is loaded for the first error answer, or for the public path."""
    import sys

    for name in [m for m in sys.modules if m == "google.genai" or m.startswith("google.genai.")]:
        monkeypatch.setitem(sys.modules, name, None)  # importing it now raises ImportError
    embedder = GeminiEmbedder(api_key=SecretStr("k"), base_url=emulator.base_url)
    try:
        for config in (EmbedConfig("gemini-embedding-001"), EmbedConfig("gemini-embedding-001", None, 256)):
            vectors = stack(await embedder.call(["without the sdk"], config))
            want = expected_vector(
                "without the sdk", model=config.model, task_type=None, dims=config.output_dimensionality, full_dims=3072
            )
            np.testing.assert_allclose(vectors[0], want, atol=1e-6)
    finally:
        await embedder.aclose()
