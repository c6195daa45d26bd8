"""An honest fake at the embedder seam: same vectors and same rejections as the emulator."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from worker import limits
from worker.emulator import BAD_INPUT_MARKER
from worker.errors import UpstreamError, UpstreamInvalidInput
from worker.messages import EmbedConfig, Vectors
from worker.vectors import normalise, upstream_vector


class FakeEmbedder:
    def __init__(self, faults: Sequence[UpstreamError] = ()):
        self.faults = list(faults)
        self.calls: list[tuple[list[str], EmbedConfig]] = []

    async def embed(self, texts: Sequence[str], config: EmbedConfig) -> Vectors:
        self.calls.append((list(texts), config))
        if len(texts) > limits.MAX_TEXTS_PER_CALL:
            raise UpstreamInvalidInput("too many texts in one call")
        if self.faults:
            raise self.faults.pop(0)
        if any(BAD_INPUT_MARKER in t for t in texts):
            raise UpstreamInvalidInput("input rejected")
        full = limits.full_dimensions(config.model)
        rows = np.stack(
            [
                upstream_vector(
                    t, model=config.model, task_type=config.task_type, dims=config.output_dimensionality, full_dims=full
                )
                for t in texts
            ]
        ).astype(np.float32)
        return normalise(rows) if config.dimensions < full else rows

    async def aclose(self) -> None:
        return None
