"""Deterministic synthetic embeddings, shared by the emulator and by tests that check replies.

``full_vector`` derives a unit vector from (model, task_type, text) with a seeded generator, so the
same text always gets the same vector and different texts get different ones. Shorter outputs are
the first ``dims`` components, as with Gemini's Matryoshka-trained models; like the real API, the
emulator returns those *unnormalised*, and the worker must normalise them.
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]


def full_vector(text: str, *, model: str, task_type: str | None, dims: int) -> Vector:
    digest = hashlib.blake2b(
        f"{model}\x00{task_type or ''}\x00{text}".encode("utf-8", "surrogatepass"), digest_size=16
    ).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))
    vec = rng.standard_normal(dims, dtype=np.float32)
    vec /= np.float32(np.linalg.norm(vec))
    return vec


def upstream_vector(text: str, *, model: str, task_type: str | None, dims: int | None, full_dims: int) -> Vector:
    """What the (emulated) API returns: the full unit vector, or its unnormalised prefix."""
    return full_vector(text, model=model, task_type=task_type, dims=full_dims)[: dims or full_dims]


def normalise(vectors: Vector) -> Vector:
    """Rows scaled to unit length (in place when given float32)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    np.maximum(norms, np.float32(1e-12), out=norms)
    vectors /= norms
    return vectors


def expected_vector(text: str, *, model: str, task_type: str | None, dims: int | None, full_dims: int) -> Vector:
    """What a caller should receive from the worker for ``text``: the upstream vector, normalised."""
    vec = upstream_vector(text, model=model, task_type=task_type, dims=dims, full_dims=full_dims).copy()
    row: Vector = normalise(vec[None, :])[0]
    return row
