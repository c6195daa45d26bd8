"""The seam between the worker and whoever computes embeddings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from worker.messages import EmbedConfig, Vectors


class Embedder(Protocol):
    """Embeds one batch: all texts share ``config``; returns one unit-length float32 row per text.

    Implementations raise ``worker.errors.UpstreamError`` (or a subclass) for API failures, with
    ``transient`` telling whether a retry may help.
    """

    async def embed(self, texts: Sequence[str], config: EmbedConfig) -> Vectors: ...

    async def aclose(self) -> None: ...
