"""An honest fake at the embedder seam: same vectors and same rejections as the emulator."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from worker import limits
from worker.emulator import BAD_INPUT_MARKER
from worker.errors import UpstreamError, UpstreamInvalidInput
from worker.messages import EmbedConfig
from worker.ports import CacheUnavailable, Existing, StoredVector, StoreUnavailable
from worker.vectors import FloatArray, normalise, upstream_vector


class FakeEmbedder:
    def __init__(self, faults: Sequence[UpstreamError] = ()):
        self.faults = list(faults)
        self.calls: list[tuple[list[str], EmbedConfig]] = []

    async def call(self, texts: Sequence[str], config: EmbedConfig) -> FloatArray:
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


class MemoryStore:
    """``ports.VectorStore`` in a dict, with Redis's rules that matter here: a key
    holding another type (a string, a list) refuses hash commands with WRONGTYPE, for that key only; a write carrying
    an older sequence than the key's ``embedding_seq`` leaves the key alone.

    Faults: ``down`` (nothing answers), ``refusing`` (Redis answers reads but takes no writes: full under
    noeviction, or a read-only replica; the reason is what the store says), ``refuse_writes`` (that many next
    writes refused as by a Redis that ran out of memory during the round, while probes still pass)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}  # key -> dict of fields (a hash), or anything else (another type)
        self.jobs_hash: dict[str, bytes] = {}
        self.down = False
        self.refusing: str | None = None
        self.refuse_writes = 0
        self.probes = 0  # writability probes answered, refused or not
        self.called = asyncio.Event()  # set by every call (none awaits inside): what ``until`` waits on
        self._clock = itertools.count(1)

    async def until(self, condition: Callable[[], bool], timeout: float = 5) -> None:
        """Return once ``condition`` holds, checked after every call on the store; TimeoutError past ``timeout``."""
        async with asyncio.timeout(timeout):
            while True:
                self.called.clear()
                if condition():
                    return
                await self.called.wait()

    def _check(self) -> None:
        self.called.set()
        if self.down:
            raise StoreUnavailable("redis is down")

    def _check_write(self) -> None:
        self._check()
        if self.refusing:
            raise StoreUnavailable(self.refusing)
        if self.refuse_writes:
            self.refuse_writes -= 1
            raise StoreUnavailable("redis refused the write: OutOfMemoryError: command not allowed")

    async def clock(self) -> int:
        self._check()
        return next(self._clock)

    async def write(self, entries: Sequence[StoredVector], seq: int | None = None) -> list[str | None]:
        self._check_write()
        return [self._hset(e, seq) for e in entries]

    def _hset(self, e: StoredVector, seq: int | None) -> str | None:
        current = self.data.setdefault(e.key, {})
        if not isinstance(current, dict):
            return "redis refused the write to this key: WRONGTYPE Operation against a key holding the wrong kind"
        have = current.get("embedding_seq")
        if seq is not None and isinstance(have, str) and have.isdigit() and int(have) > seq:
            return None  # a later round's vector stays
        current.update(
            {
                "embedding": e.vector.astype("<f4").tobytes(),
                "embedding_model": e.model,
                "embedding_dimensions": str(e.vector.shape[0]),
                "embedding_text_hash": e.text_hash,
            }
        )
        if seq is not None:
            current["embedding_seq"] = str(seq)
        return None

    async def existing(self, keys: Sequence[str]) -> list[Existing]:
        self._check()
        out = []
        for key in keys:
            current = self.data.get(key, {})
            if not isinstance(current, dict):
                out.append(Existing(error="redis refused to read this key: WRONGTYPE"))
                continue
            dims = current.get("embedding_dimensions")
            out.append(
                Existing(
                    current.get("embedding_text_hash"),
                    current.get("embedding_model"),
                    int(dims) if isinstance(dims, str) and dims.isdigit() else None,
                )
            )
        return out

    async def save_job(self, name: str, record: bytes) -> None:
        self._check_write()
        self.jobs_hash[name] = record

    async def jobs(self) -> dict[str, bytes]:
        self._check()
        return dict(self.jobs_hash)

    async def complete_job(
        self, name: str, entries: Sequence[StoredVector], seq: int | None = None
    ) -> list[str | None]:
        self._check_write()
        self.jobs_hash.pop(name, None)
        return [self._hset(e, seq) for e in entries]

    async def drop_job(self, name: str) -> None:
        self._check_write()
        self.jobs_hash.pop(name, None)

    async def writable(self) -> None:
        self.probes += 1
        self._check()
        if self.refusing:
            raise StoreUnavailable(self.refusing)

    async def ping(self) -> bool:
        try:
            await self.writable()
        except StoreUnavailable:
            return False
        return True


class MemoryCache:
    """``ports.VectorCache`` in a dict; ``down`` makes every call fail as a timed-out Redis would."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.down = False
        self.reads = 0

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self.reads += 1
        if self.down:
            raise CacheUnavailable("TimeoutError: cache did not answer")
        return [self.data.get(k) for k in keys]

    async def put_many(self, entries: Sequence[tuple[str, bytes]]) -> None:
        if self.down:
            raise CacheUnavailable("TimeoutError: cache did not answer")
        self.data.update(entries)
