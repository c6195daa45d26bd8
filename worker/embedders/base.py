"""The seam between the worker and whoever computes embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from worker.errors import EmbedError
from worker.messages import EmbedConfig, Vectors
from worker.vectors import Vector


class Embedder(Protocol):
    """Embeds one batch: all texts share ``config``; returns one unit-length float32 row per text.

    Implementations raise ``worker.errors.UpstreamError`` (or a subclass) for API failures, with
    ``transient`` telling whether a retry may help.
    """

    async def embed(self, texts: Sequence[str], config: EmbedConfig) -> Vectors: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class JobResult:
    """A finished Batch API job: what became of each text, in order (empty if the job failed as a whole)."""

    succeeded: bool
    state: str
    outcomes: list[Vector | EmbedError]
