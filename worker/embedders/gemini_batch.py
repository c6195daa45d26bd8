"""Gemini Batch API jobs for embeddings: submit now, collect later, at the Batch API's lower price.

``client.aio.batches.create_embeddings`` posts ``{model}:asyncBatchEmbedContent`` with the texts inlined, as
``embedders.request.build_request`` builds them for the synchronous path too (same task handling, same vectors);
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
from worker.embedders.request import build_request
from worker.errors import EmbedError, InvalidRequest, UpstreamError
from worker.inputs import EmbedInput
from worker.messages import EmbedConfig
from worker.ports import JobResult
from worker.vectors import FloatArray, normalise

_PENDING = {"JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_QUEUED", "JOB_STATE_UNSPECIFIED"}
NOT_FOUND = "NOT_FOUND"  # the state of a job the API answers 404 NOT_FOUND for


class GeminiBatchJobs:
    def __init__(self, client: genai.Client):
        self._client = client

    async def submit(self, texts: Sequence[EmbedInput], config: EmbedConfig, display_name: str) -> str:
        request = build_request(config, texts)  # built as the synchronous path builds its requests
        contents: list[Any] = request.sdk_contents()
        batch = types.EmbedContentBatch(contents=contents, config=request.sdk_config())
        try:
            job = await self._client.aio.batches.create_embeddings(
                model=request.model,
                src=types.EmbeddingsBatchJobSource(inlined_requests=batch),
                config=types.CreateEmbeddingsBatchJobConfig(display_name=display_name),
            )
        except genai_errors.APIError as exc:
            raise map_api_error(exc) from None
        if not job.name:
            raise UpstreamError("the Batch API returned a job without a name", retry_now=True)
        return job.name

    async def result(self, name: str, config: EmbedConfig, count: int) -> JobResult | None:
        """None while the job runs; otherwise what became of each text. A job the API no longer knows (deleted, or
        past its retention) has ended too: as a failed job (state ``NOT_FOUND``), so that its texts are sent again."""
        try:
            job = await self._client.aio.batches.get(name=name)
        except genai_errors.APIError as exc:
            if _unknown_job(exc):
                return JobResult(False, NOT_FOUND, [])
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


def _unknown_job(exc: genai_errors.APIError) -> bool:
    """The API's own 404 for a job name (status NOT_FOUND), not a 404 from something else on the way (a proxy's
    page has no such status), which says nothing about the job."""
    return exc.code == 404 and exc.status == NOT_FOUND
