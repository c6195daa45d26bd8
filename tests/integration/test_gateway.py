"""The HTTP gateway, called with the real ``openai`` and ``google-genai`` SDKs (and LangChain), in front of a real
worker and the emulator on this test's vhost: the right vector for each input, both encodings, keys, limits, the
in-flight bound, lanes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from worker import limits
from worker.amqp.connection import declare_once
from worker.client import EmbedClient
from worker.emulator import EmulatorState
from worker.gateway.app import Running, connect, listen
from worker.gateway.settings import GatewaySettings
from worker.vectors import expected_vector, seed_of

pytestmark = pytest.mark.integration

KEY, OTHER_KEY = "gw-key-one", "gw-key-two"
G1, G2 = "gemini-embedding-001", "gemini-embedding-2"


@dataclass
class Gateway:
    url: str  # http://127.0.0.1:PORT
    running: Running

    def openai(self, key: str = KEY, **options: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key=key, base_url=f"{self.url}/v1", max_retries=0, **options)

    def genai(self, key: str = KEY, **headers: str) -> genai.Client:
        return genai.Client(api_key=key, http_options=types.HttpOptions(base_url=self.url, headers=headers or None))


def gateway_settings(vhost: str, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "amqp_url": vhost,
        "gateway_host": "127.0.0.1",
        "gateway_port": 0,
        "gateway_api_keys": f"{KEY},{OTHER_KEY}",
        "amqp_connect_timeout_s": 5,
        **overrides,
    }
    return GatewaySettings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
async def start_gateway(vhost: str) -> AsyncIterator[Callable[..., Any]]:
    """Gateways in this test's event loop (so the worker, the gateway and the SDK share it), on its vhost."""
    stack = contextlib.AsyncExitStack()

    async def start(**overrides: Any) -> Gateway:
        settings = gateway_settings(vhost, **overrides)
        client = EmbedClient(vhost, max_in_flight=settings.gateway_max_in_flight)
        await connect(client, settings)
        stack.push_async_callback(client.close)
        running = await listen(settings, client)
        stack.push_async_callback(running.aclose, 1.0)
        return Gateway(f"http://127.0.0.1:{running.port}", running)

    async with stack:
        yield start


def want(text: str, *, model: str = G1, task_type: str | None = None, dims: int | None = None) -> np.ndarray:
    return expected_vector(text, model=model, task_type=task_type, dims=dims, full_dims=limits.full_dimensions(model))


def assert_vectors(got: list[Any], texts: list[str], **config: Any) -> None:
    """Each vector (floats, or the base64 of little-endian float32 the SDK hands back as it came when asked for
    base64) is the one of its own text."""
    assert len(got) == len(texts)
    for i, text in enumerate(texts):
        row = np.frombuffer(base64.b64decode(got[i]), "<f4") if isinstance(got[i], str) else np.asarray(got[i])
        assert np.allclose(row.astype(np.float32), want(text, **config), atol=1e-6), f"vector {i} is not of {text!r}"


# ---------------------------------------------------------------------- OpenAI
@pytest.mark.parametrize("encoding", [None, "float", "base64"])  # None: the SDK's default, which asks for base64
async def test_openai_sdk_gets_the_vector_of_each_text(
    start_worker: Any, start_gateway: Any, encoding: str | None
) -> None:
    await start_worker()
    gateway = await start_gateway()
    texts = ["first text", "second text", "third, a longer text than the others"]
    options = {"encoding_format": encoding} if encoding else {}
    async with gateway.openai() as client:
        response = await client.embeddings.create(model=G1, input=texts, dimensions=256, **options)
    assert response.object == "list" and response.model == G1
    assert [d.index for d in response.data] == [0, 1, 2]
    assert_vectors([d.embedding for d in response.data], texts, dims=256)
    tokens = sum(limits.estimate_tokens(t) for t in texts)
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens


async def test_openai_single_string_full_size_and_the_other_key(start_worker: Any, start_gateway: Any) -> None:
    await start_worker()
    gateway = await start_gateway()
    async with gateway.openai(OTHER_KEY) as client:
        response = await client.embeddings.create(model=G2, input="just one", user="alice\nforged line")
    assert len(response.data) == 1 and len(response.data[0].embedding) == 3072
    assert_vectors([response.data[0].embedding], ["just one"], model=G2)


async def test_openai_refusals_in_openai_shapes(start_worker: Any, start_gateway: Any) -> None:
    await start_worker()
    gateway = await start_gateway(max_body_bytes=64 * 1024)
    async with gateway.openai("not-a-key") as client:
        with pytest.raises(openai.AuthenticationError) as auth:
            await client.embeddings.create(model=G1, input="x")
    assert auth.value.status_code == 401 and auth.value.code == "invalid_api_key"
    async with gateway.openai() as client:
        with pytest.raises(openai.NotFoundError) as missing:
            await client.embeddings.create(model="text-embedding-3-small", input="x")
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as tokens:
            await client.embeddings.create(model=G1, input=[[1, 2, 3]])
        assert "token arrays" in tokens.value.message and tokens.value.param == "input"
        with pytest.raises(openai.BadRequestError) as dims:
            await client.embeddings.create(model=G1, input="x", dimensions=5)
        assert dims.value.param == "dimensions"  # the worker's own check, named in OpenAI's terms
        with pytest.raises(openai.APIStatusError) as big:
            await client.embeddings.create(model=G1, input=["y" * 70_000])
        assert big.value.status_code == 413
        assert big.value.body["code"] == "request_too_large"  # type: ignore[index]


async def test_overload_is_429_with_retry_after_and_no_queue(
    start_worker: Any, start_gateway: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    """With one request in flight allowed, a second one is refused at once while the first waits in the queue (no
    worker consumes yet: it stays in flight as long as the test wants), then the first is served."""
    await declare_once(vhost)  # the worker's topology, and no worker yet
    gateway = await start_gateway(gateway_max_in_flight=1)
    async with gateway.openai() as client:
        first = asyncio.create_task(client.embeddings.create(model=G1, input="waits in the queue"))
        deadline = asyncio.get_running_loop().time() + 10
        while gateway.running.gateway.in_flight < 1:  # the first one's head is being served
            assert asyncio.get_running_loop().time() < deadline, "the first request never arrived"
            await asyncio.sleep(0.005)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.embeddings.create(model=G1, input="one too many")
        assert refused.value.response.headers["Retry-After"] == "1"
        assert refused.value.code == "overloaded"
        await start_worker()
        assert_vectors([(await first).data[0].embedding], ["waits in the queue"])
    assert emulator_state.texts == 1  # the refused one never reached the broker


async def test_bulk_lane_header_and_langchain(start_worker: Any, start_gateway: Any) -> None:
    from langchain_openai import OpenAIEmbeddings

    await start_worker()
    gateway = await start_gateway()
    # LangChain counts tokens with tiktoken and sends token arrays unless told not to (and tiktoken would download
    # its tables): check_embedding_ctx_length=False sends the texts.
    embeddings = OpenAIEmbeddings(
        model=G1,
        api_key=KEY,  # type: ignore[arg-type]
        base_url=f"{gateway.url}/v1",
        check_embedding_ctx_length=False,
        dimensions=128,
        max_retries=0,
        default_headers={"X-Embed-Lane": "bulk"},
    )
    vectors = await embeddings.aembed_documents(["lang one", "lang two"])
    assert_vectors(vectors, ["lang one", "lang two"], dims=128)


# ---------------------------------------------------------------------- Gemini
async def test_genai_sdk_batch_embed_through_the_gateway(start_worker: Any, start_gateway: Any) -> None:
    await start_worker()
    gateway = await start_gateway()
    client = gateway.genai()
    texts = ["gemini a", "gemini b"]
    config = types.EmbedContentConfig(task_type="RETRIEVAL_DOCUMENT", output_dimensionality=256)
    response = await client.aio.models.embed_content(model=G1, contents=texts, config=config)
    assert response.embeddings is not None
    assert_vectors([e.values or [] for e in response.embeddings], texts, task_type="RETRIEVAL_DOCUMENT", dims=256)
    # gemini-embedding-2: one content per input (a list of strings would be merged into one content by the SDK, as
    # against the API), and an image with its caption, which yields one vector.
    photo = png(1)
    contents = [
        types.Content(parts=[types.Part(text="g2 text")]),
        types.Content(parts=[types.Part.from_bytes(data=photo, mime_type="image/png"), types.Part(text="a cat")]),
    ]
    second = await client.aio.models.embed_content(model=G2, contents=contents)
    assert second.embeddings is not None and len(second.embeddings) == 2
    assert_vectors([second.embeddings[0].values or []], ["g2 text"], model=G2)
    seed = seed_of([("inline", "image/png", photo), ("text", "", b"a cat")])
    assert_vectors([second.embeddings[1].values or []], [seed], model=G2)


async def test_genai_wrong_key_unknown_model_and_embed_content(start_worker: Any, start_gateway: Any) -> None:
    await start_worker()
    gateway = await start_gateway()
    with pytest.raises(genai_errors.ClientError) as wrong:
        await gateway.genai("wrong").aio.models.embed_content(model=G1, contents="x")
    assert wrong.value.code == 400 and wrong.value.status == "INVALID_ARGUMENT"
    assert wrong.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    with pytest.raises(genai_errors.ClientError) as missing:
        await gateway.genai().aio.models.embed_content(model="no-such-model", contents="x")
    assert missing.value.code == 404 and missing.value.status == "NOT_FOUND"
    # :embedContent, with the key in the query, as curl users write it
    async with aiohttp.ClientSession() as session:
        url = f"{gateway.url}/v1beta/models/{G1}:embedContent?key={KEY}"
        body = {"content": {"parts": [{"text": "by curl"}]}, "outputDimensionality": 128}
        async with session.post(url, json=body) as response:
            assert response.status == 200
            answer = await response.json()
        assert_vectors([answer["embedding"]["values"]], ["by curl"], dims=128)
        async with session.post(url, data=b"x" * (5 * 1024 * 1024)) as response:
            assert response.status == 413
            assert (await response.json())["error"]["status"] == "INVALID_ARGUMENT"


async def test_health_readiness_and_metrics(start_worker: Any, start_gateway: Any) -> None:
    await start_worker()
    gateway = await start_gateway()
    async with gateway.openai() as client:
        await client.embeddings.create(model=G1, input="counted")
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/readyz"):
            async with session.get(gateway.url + path) as response:
                assert response.status == 200, path
        async with session.get(gateway.url + "/metrics") as response:
            text = await response.text()
    assert 'embed_gateway_requests_total{route="openai.embeddings",status="200"} 1.0' in text
    assert "embed_gateway_in_flight 0.0" in text and "embed_gateway_ready 1.0" in text
    assert KEY not in text


def png(seed: int, size: int = 2000) -> bytes:
    """A PNG-shaped blob: a real signature and IHDR (the worker reads the size), then random bytes."""
    ihdr = struct.pack(">IIBBBBB", 640, 480, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return head + np.random.default_rng(seed).integers(0, 256, size - len(head), dtype=np.uint8).tobytes()
