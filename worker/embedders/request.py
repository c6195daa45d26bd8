"""One Gemini embedding request, built once from ``(EmbedConfig, inputs)``: what every call path sends.

``build_request`` makes every decision about the request body, and nothing else does (as httpx's ``build_request``
does for HTTP; the transports only send what it built):
- the task: a model that takes it in the prompt (``limits.Model.task_in_prompt``: gemini-embedding-2) gets the
  documented instruction in each text (``inputs.with_task``) and never ``taskType``; any other model gets ``taskType``;
- ``outputDimensionality`` when the configuration names one;
- one content per input, always: given a list of strings, google-genai merges them into ONE content for
  gemini-embedding-2 and returns one embedding (python-genai#2523), so the SDK is handed one ``Content`` per input.

``EmbedRequest`` renders that one request for each way of sending it: ``rest_requests`` (the REST API's
``batchEmbedContents`` entries, posted by the fast path), ``sdk_contents`` and ``sdk_config`` (for the SDK's
``models.embed_content`` and ``batches.create_embeddings``). tests/unit/test_request_builder.py checks that all
three paths put the same request on the wire.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker import inputs
from worker.inputs import EmbedInput
from worker.messages import EmbedConfig

if TYPE_CHECKING:
    from google.genai import types  # imported where used: google-genai costs ~0.5 s to import (gemini.py)


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    model: str  # without the "models/" prefix
    inputs: tuple[EmbedInput, ...]  # as sent: a task instruction is already in the texts
    task_type: str | None  # ``taskType``, or None when it is not sent
    output_dimensionality: int | None

    def rest_requests(self) -> list[dict[str, Any]]:
        """The ``requests`` of a ``batchEmbedContents`` body, one per input (REST camelCase field names)."""
        model = f"models/{self.model}"
        extra: dict[str, Any] = {}
        if self.task_type is not None:
            extra["taskType"] = self.task_type
        if self.output_dimensionality is not None:
            extra["outputDimensionality"] = self.output_dimensionality
        return [{"model": model, "content": {"parts": inputs.rest_parts(item)}, **extra} for item in self.inputs]

    def sdk_contents(self) -> list[types.Content]:
        return [_sdk_content(item) for item in self.inputs]

    def sdk_config(self) -> types.EmbedContentConfig:
        from google.genai import types

        return types.EmbedContentConfig(task_type=self.task_type, output_dimensionality=self.output_dimensionality)


def build_request(config: EmbedConfig, items: Sequence[EmbedInput]) -> EmbedRequest:
    """The request that embeds ``items`` (one vector each) as ``config`` says, whichever path sends it."""
    return EmbedRequest(
        model=config.model,
        inputs=tuple(inputs.with_task(item, config.model, config.task_type) for item in items),
        task_type=inputs.api_task_type(config.model, config.task_type) or None,
        output_dimensionality=config.output_dimensionality or None,
    )


def _sdk_content(item: EmbedInput) -> types.Content:
    from google.genai import types

    if isinstance(item, str):
        return types.Content(parts=[types.Part(text=item)])
    parts = []
    for part in item.parts:
        if part.text is not None:
            parts.append(types.Part(text=part.text))
        elif part.data is not None:
            parts.append(types.Part.from_bytes(data=part.data, mime_type=part.mime_type or ""))
        else:
            parts.append(types.Part.from_uri(file_uri=part.file_uri or "", mime_type=part.mime_type))
    return types.Content(parts=parts)
