"""Gemini Batch API jobs for embeddings: submit now, collect later, at the Batch API's lower price.

``client.aio.batches.create_embeddings`` posts ``{model}:asyncBatchEmbedContent`` with the texts inlined;
``client.aio.batches.get`` reads the job, whose finished form carries one response (or error) per text,
in order. The trade-off (README): about half the price of synchronous calls, but results arrive when
the job finishes, which Google targets within 24 hours; each item succeeds or fails on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from worker import limits
from worker.embedders.gemini import map_api_error
from worker.errors import EmbedError, InvalidRequest, UpstreamError
from worker.messages import EmbedConfig
from worker.ports import JobResult
from worker.vectors import FloatArray, normalise

_PENDING = {"JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_QUEUED", "JOB_STATE_UNSPECIFIED"}


class GeminiBatchJobs:
    def __init__(self, client: genai.Client):
        self._client = client

    async def submit(self, texts: Sequence[str], config: EmbedConfig, display_name: str) -> str:
        contents: list[Any] = list(texts)
        src = types.EmbeddingsBatchJobSource(
            inlined_requests=types.EmbedContentBatch(
                contents=contents,
                config=types.EmbedContentConfig(
                    task_type=config.task_type, output_dimensionality=config.output_dimensionality
                ),
            )
        )
        try:
            job = await self._client.aio.batches.create_embeddings(
                model=config.model, src=src, config=types.CreateEmbeddingsBatchJobConfig(display_name=display_name)
            )
        except genai_errors.APIError as exc:
            raise map_api_error(exc) from None
        if not job.name:
            raise UpstreamError("the Batch API returned a job without a name", retry_now=True)
        return job.name

    async def result(self, name: str, config: EmbedConfig, count: int) -> JobResult | None:
        """None while the job runs; otherwise what became of each text."""
        try:
            job = await self._client.aio.batches.get(name=name)
        except genai_errors.APIError as exc:
            raise map_api_error(exc) from None
        state = str(job.state.value if job.state is not None else "JOB_STATE_UNSPECIFIED")
        if state in _PENDING:
            return None
        responses = job.dest.inlined_embed_content_responses if job.dest is not None else None
        if state != "JOB_STATE_SUCCEEDED" or responses is None or len(responses) != count:
            return JobResult(False, state, [])
        full = limits.full_dimensions(config.model)
        outcomes: list[FloatArray | EmbedError] = []
        for item in responses:
            values = item.response.embedding.values if item.response and item.response.embedding else None
            if values is None or len(values) != config.dimensions:
                message = item.error.message if item.error is not None else "no embedding in the job's output"
                outcomes.append(InvalidRequest(f"rejected by the Batch API: {message}"))
                continue
            vector = np.asarray(values, dtype=np.float32)
            if config.dimensions < full:
                vector = normalise(vector[None, :])[0]
            outcomes.append(vector)
        return JobResult(True, state, outcomes)
