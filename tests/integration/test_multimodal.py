"""gemini-embedding-2 through the worker and through the real google-genai SDK: long texts, images, mixed parts,
batches within the request-size budget, and the SDK's merge trap. Every vector is checked against the input it
belongs to (the emulator derives it from every part's bytes)."""

from __future__ import annotations

import base64
import struct
import zlib
from typing import Any

import httpx
import numpy as np
import pytest
from google import genai
from google.genai import types
from pydantic import SecretStr

from tests.integration.helpers import RawCaller
from worker.embedders.gemini import GeminiEmbedder
from worker.emulator import EmulatorState, EmulatorThread
from worker.inputs import Content, EmbedInput, Part, api_task_type, seed_parts, with_task
from worker.messages import EmbedConfig
from worker.vectors import expected_vector, seed_of

pytestmark = pytest.mark.integration

G2 = "gemini-embedding-2"


def png(seed: int, size: int = 2000, width: int = 640, height: int = 480) -> bytes:
    """A PNG-shaped blob: a real signature and IHDR (the worker reads the size for its token estimate), then bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    body = np.random.default_rng(seed).integers(0, 256, max(0, size - len(head)), dtype=np.uint8).tobytes()
    return head + body


def image_part(data: bytes, mime: str = "image/png") -> dict[str, Any]:
    return {"inline_data": {"mime_type": mime, "data": base64.b64encode(data).decode()}}


def expected(item: EmbedInput, *, model: str = G2, task_type: str | None = None, dims: int | None = None) -> Any:
    """What the worker should answer for an input: the emulator's vector of what the worker sends, normalised."""
    sent = with_task(item, model, task_type)
    api_task = api_task_type(model, task_type)
    return expected_vector(seed_of(seed_parts(sent)), model=model, task_type=api_task, dims=dims, full_dims=3072)


def check(reply: dict[str, Any], items: list[EmbedInput], **config: Any) -> None:
    assert "error" not in reply, reply
    got = np.asarray(reply["embeddings"], dtype=np.float32)
    assert got.shape[0] == len(items)
    for i, item in enumerate(items):
        assert np.allclose(got[i], expected(item, **config), atol=1e-6), f"input {i} got another input's vector"


async def test_long_texts_are_refused_on_001_and_taken_by_2(start_worker: Any, vhost: str) -> None:
    await start_worker()
    long_text = "word " * 6000  # 30,000 characters: about 7,500 tokens
    async with RawCaller(vhost) as caller:
        refused = await caller.call({"text": long_text})
        taken = await caller.call({"text": long_text, "model": G2})
    assert (
        refused["error"]["code"] == "invalid_request"
        and "gemini-embedding-001 takes 2048" in refused["error"]["message"]
    )
    check(taken, [long_text])


async def test_an_image_mixed_parts_and_texts_each_get_their_own_vector(start_worker: Any, vhost: str) -> None:
    await start_worker()
    photo, other = png(1), png(2)
    request = {
        "model": G2,
        "output_dimensionality": 768,
        "inputs": [
            {"parts": [image_part(photo)]},
            {"parts": [image_part(photo), {"text": "a cat on a mat"}]},  # an image and its caption: one vector
            {"text": "just text"},
            {"parts": [image_part(other)]},
        ],
    }
    async with RawCaller(vhost) as caller:
        reply = await caller.call(request)
    items: list[EmbedInput] = [
        Content((Part(mime_type="image/png", data=photo),)),
        Content((Part(mime_type="image/png", data=photo), Part(text="a cat on a mat"))),
        "just text",
        Content((Part(mime_type="image/png", data=other),)),
    ]
    check(reply, items, dims=768)
    got = np.asarray(reply["embeddings"])
    assert not np.allclose(got[0], got[3]) and not np.allclose(got[0], got[1])  # bytes and captions matter


async def test_many_images_go_out_in_calls_under_the_byte_budget(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    budget = 300_000
    emulator_state.max_request_bytes = budget  # the API's own limit, as the emulator plays it
    await start_worker(upstream_max_request_bytes=budget, batch_max_wait_ms=100, max_body_bytes=16 << 20)
    images = [png(i, size=40_000) for i in range(20)]  # ~53 KB each in base64: about 5 per call
    async with RawCaller(vhost) as caller:
        cids = [await caller.send({"model": G2, "inputs": [{"parts": [image_part(img)]}]}) for img in images]
        replies = [await caller.reply(cid) for cid in cids]
    for img, reply in zip(images, replies, strict=True):
        check(reply, [Content((Part(mime_type="image/png", data=img),))])
    assert emulator_state.rejected == 0  # no call ever went over the API's limit
    assert len(emulator_state.call_bytes) >= 4 and max(emulator_state.call_bytes) <= budget
    assert sum(emulator_state.batch_sizes) == 20 and max(emulator_state.batch_sizes) < 20


async def test_an_input_over_the_budget_alone_is_refused_never_sent(
    start_worker: Any, vhost: str, emulator_state: EmulatorState
) -> None:
    await start_worker(upstream_max_request_bytes=100_000, max_body_bytes=16 << 20)
    async with RawCaller(vhost) as caller:
        reply = await caller.call({"model": G2, "inputs": [{"parts": [image_part(png(7, size=200_000))]}]})
    assert reply["error"]["code"] == "invalid_request" and "one call carries 100000" in reply["error"]["message"]
    assert emulator_state.calls == 0


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        ({"inputs": [{"parts": [{"inline_data": {"mime_type": "image/png", "data": "aGk="}}]}]}, "takes text only"),
        ({"model": G2, "inputs": [{"parts": [image_part(b"gif!", "image/gif")]}]}, "'image/gif' is not a type"),
        ({"model": G2, "inputs": [{"parts": [{"inline_data": {"mime_type": "image/png", "data": "%%%"}}]}]}, "base64"),
        ({"model": G2, "inputs": [{"parts": [image_part(png(i)) for i in range(7)]}]}, "7 image parts"),
        ({"model": G2, "inputs": [{"parts": []}]}, "non-empty list"),
        ({"model": G2, "texts": ["a"], "inputs": [{"text": "b"}]}, 'not both "texts" and "inputs"'),
    ],
)
async def test_what_a_model_cannot_take_is_refused_with_its_reason(
    start_worker: Any, vhost: str, emulator_state: EmulatorState, request_: dict[str, Any], fragment: str
) -> None:
    await start_worker()
    async with RawCaller(vhost) as caller:
        reply = await caller.call(request_)
    assert reply["error"]["code"] == "invalid_request" and fragment in reply["error"]["message"], reply
    assert emulator_state.calls == 0


async def test_task_type_becomes_the_documented_instruction_on_2(start_worker: Any, vhost: str) -> None:
    await start_worker()
    async with RawCaller(vhost) as caller:
        reply = await caller.call(
            {"texts": ["how do quorum queues work?"], "model": G2, "task_type": "RETRIEVAL_QUERY"}
        )
    check(reply, ["how do quorum queues work?"], task_type="RETRIEVAL_QUERY")  # "task: search result | query: ..."


@pytest.mark.parametrize("fast_path", [True, False])
async def test_n_inputs_give_n_vectors_on_both_embedder_paths(emulator: EmulatorThread, fast_path: bool) -> None:
    """google-genai merges a list of strings into ONE content for a multimodal model; the worker sends a Content per
    input on its SDK path too, and both paths give one vector per input."""
    embedder = GeminiEmbedder(api_key=SecretStr("k"), base_url=emulator.base_url, fast_path=fast_path)
    photo = png(3)
    items: list[EmbedInput] = ["first", "second", Content((Part(mime_type="image/png", data=photo), Part(text="x")))]
    try:
        vectors = await embedder.call(items, EmbedConfig(G2, "CLUSTERING", 256))
    finally:
        await embedder.aclose()
    assert embedder.fast_path is fast_path and vectors.shape == (3, 256)
    for vector, item in zip(vectors, items, strict=True):
        assert np.allclose(vector, expected(item, task_type="CLUSTERING", dims=256), atol=1e-6)


async def test_the_sdk_merge_trap_is_real_and_the_emulator_shows_it(emulator: EmulatorThread) -> None:
    """What the worker must never do: a plain list of strings to a multimodal model comes back as one vector."""
    async with httpx.AsyncClient() as http:
        options = types.HttpOptions(base_url=emulator.base_url, timeout=10_000, httpx_async_client=http)
        client = genai.Client(api_key="k", http_options=options)
        response = await client.aio.models.embed_content(model=G2, contents=["first", "second", "third"])
    assert len(response.embeddings or []) == 1
