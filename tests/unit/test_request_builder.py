"""Every call path sends the one request ``embedders.request.build_request`` builds: the fast path, the SDK's public
method and the Batch API (``batches.create_embeddings``), compared as they go on the wire, through the real SDK to
the emulator, for every model x task type x output dimensionality, texts and parts alike.

The SDK writes JSON in its own spelling (snake_case ``inline_data``, URL-safe base64) where the fast path writes the
REST API's (``inlineData``, standard base64); the API reads both alike, so bodies are compared after ``canonical``
undoes only that. A Batch API request carries no ``model`` (it is in the URL); every other field must match."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from pydantic import SecretStr

from worker import limits
from worker.embedders.gemini import GeminiEmbedder
from worker.embedders.gemini_batch import GeminiBatchJobs
from worker.embedders.request import build_request
from worker.emulator import EmulatorThread
from worker.inputs import Content, EmbedInput, Part
from worker.messages import EmbedConfig
from worker.vectors import stack

G2 = "gemini-embedding-2"
MODELS = ["gemini-embedding-001", G2, "text-embedding-004"]
TASKS = [None, *sorted(limits.TASK_TYPES)]
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + (1).to_bytes(4, "big") * 2 + b"\xfb\xff\xfe"  # "+/" in base64


class Recorder(httpx.AsyncBaseTransport):
    """The real HTTP transport, keeping the path and JSON body of every POST it sends."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.posts: list[tuple[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.posts.append((request.url.path, orjson.loads(await request.aread())))
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def _camel(name: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name)


def canonical(value: Any) -> Any:
    """JSON as the API reads it: field names in camelCase, ``data`` (protobuf bytes) decoded from either base64."""
    if isinstance(value, list):
        return [canonical(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for key, item in value.items():
        if key == "data" and isinstance(item, str):
            out[key] = base64.b64decode(item.replace("-", "+").replace("_", "/") + "=" * (-len(item) % 4))
        else:
            out[_camel(key)] = canonical(item)
    return out


def inputs_for(model: str) -> list[EmbedInput]:
    texts: list[EmbedInput] = ["the cat sat", "a second text"]
    if not limits.MODELS[model].multimodal:
        return [*texts, Content((Part(text="a text part"),))]
    image = Content((Part(text="a caption"), Part(mime_type="image/png", data=PNG)))
    linked = Content((Part(mime_type="image/png", file_uri="https://example.com/a.png"),))
    return [*texts, image, linked]


def expected(model: str, task: str | None, dims: int | None, item: EmbedInput) -> dict[str, Any]:
    """One input's request, per the documented facts (limits): the task as an instruction in a text for a model
    that takes it in the prompt, else as taskType; parts as they are."""
    facts = limits.MODELS[model]
    if isinstance(item, str):
        template = limits.TASK_INSTRUCTIONS.get(task or "") if facts.task_in_prompt else None
        parts: list[dict[str, Any]] = [{"text": template.format(item) if template else item}]
    else:
        parts = []
        for p in item.parts:
            if p.text is not None:
                parts.append({"text": p.text})
            elif p.data is not None:
                parts.append({"inlineData": {"mimeType": p.mime_type, "data": p.data}})
            else:
                parts.append({"fileData": {"mimeType": p.mime_type, "fileUri": p.file_uri}})
    entry: dict[str, Any] = {"content": {"parts": parts}}
    if task and not facts.task_in_prompt:
        entry["taskType"] = task
    if dims:
        entry["outputDimensionality"] = dims
    return entry


def sync_entries(recorder: Recorder, model: str) -> list[Any]:
    """The requests of the one batchEmbedContents call made since the last look, without their ``model``."""
    ((path, body),) = recorder.posts
    recorder.posts.clear()
    assert path.endswith(f"/models/{model}:batchEmbedContents")
    entries = canonical(body)["requests"]
    for entry in entries:
        assert entry.pop("model") == f"models/{model}"
    return list(entries)


def batch_entries(recorder: Recorder, model: str) -> list[Any]:
    """The inlined requests of the one Batch API job created since the last look."""
    ((path, body),) = recorder.posts
    recorder.posts.clear()
    assert path.endswith(f"/models/{model}:asyncBatchEmbedContent")
    return [item["request"] for item in canonical(body)["batch"]["inputConfig"]["requests"]["requests"]]


@pytest.fixture
async def paths(emulator: EmulatorThread) -> AsyncIterator[dict[str, tuple[GeminiEmbedder, Recorder]]]:
    made = {}
    for name, fast in (("fast", True), ("public", False)):
        recorder = Recorder()
        embedder = GeminiEmbedder(
            api_key=SecretStr("k"), base_url=emulator.base_url, fast_path=fast, transport=recorder
        )
        assert embedder.fast_path is fast
        made[name] = (embedder, recorder)
    yield made
    for embedder, _ in made.values():
        await embedder.aclose()


@pytest.mark.filterwarnings("ignore::google.genai._common.ExperimentalWarning")
@pytest.mark.parametrize("model", MODELS)
async def test_every_path_sends_the_same_request(paths: dict[str, tuple[GeminiEmbedder, Recorder]], model: str) -> None:
    """For each task type (none, and each of limits') and output dimensionality (none, 256): what the fast path, the
    public method and the Batch API send, against what the documented facts say to send."""
    (fast, fast_wire), (public, public_wire) = paths["fast"], paths["public"]
    items = inputs_for(model)
    wrong = []
    for task in TASKS:
        for dims in (None, 256):
            config = EmbedConfig(model, task, dims)
            want = [expected(model, task, dims, item) for item in items]
            fast_vectors = stack(await fast.call(items, config))
            public_vectors = stack(await public.call(items, config))
            sent = {"fast path": sync_entries(fast_wire, model), "public method": sync_entries(public_wire, model)}
            await GeminiBatchJobs(public.client).submit(items, config, display_name="t")
            sent["Batch API"] = batch_entries(public_wire, model)
            wrong += [(path, task, dims, entries, want) for path, entries in sent.items() if entries != want]
            assert (fast_vectors == public_vectors).all()
    assert not wrong, f"{[w[:3] for w in wrong]}; the first sent {wrong[0][3]}, not {wrong[0][4]}"


def test_the_builder_never_sends_task_type_to_gemini_embedding_2() -> None:
    request = build_request(EmbedConfig(G2, "RETRIEVAL_DOCUMENT"), ["the cat sat"])
    assert request.rest_requests() == [
        {"model": f"models/{G2}", "content": {"parts": [{"text": "title: none | text: the cat sat"}]}}
    ]
    assert request.sdk_config().task_type is None
