"""Deterministic synthetic embeddings, shared by the emulator and by tests that check replies.

``full_vector`` derives a unit vector from (model, task_type, text) with a seeded generator, so the
same text always gets the same vector and different texts get different ones. Shorter outputs are
the first ``dims`` components, as with Gemini's Matryoshka-trained models; like the real API, the
emulator returns those *unnormalised*, and the worker must normalise them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

# Float32 vectors, one (dims,) or many (count, dims): the one array type the package passes around.
FloatArray = npt.NDArray[np.float32]


def seed_of(parts: Sequence[tuple[str, str, bytes]]) -> str:
    """What an input's vector derives from, given its parts as (kind, mime type, payload): a lone text part is
    its text (so it gets the same vector as that text sent alone); anything else, a digest of every part's kind,
    mime type and bytes, in order (so the same image always gets the same vector, and another image another)."""
    if len(parts) == 1 and parts[0][0] == "text":
        return parts[0][2].decode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(digest_size=16)
    for kind, mime, payload in parts:
        digest.update(f"{kind}\0{mime}\0{len(payload)}\0".encode() + payload)
    return "parts:" + digest.hexdigest()


def full_vector(text: str, *, model: str, task_type: str | None, dims: int) -> FloatArray:
    digest = hashlib.blake2b(
        f"{model}\x00{task_type or ''}\x00{text}".encode("utf-8", "surrogatepass"), digest_size=16
    ).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))
    vec = rng.standard_normal(dims, dtype=np.float32)
    vec /= np.float32(np.linalg.norm(vec))
    return vec


def upstream_vector(text: str, *, model: str, task_type: str | None, dims: int | None, full_dims: int) -> FloatArray:
    """What the (emulated) API returns: the full unit vector, or its unnormalised prefix."""
    return full_vector(text, model=model, task_type=task_type, dims=full_dims)[: dims or full_dims]


def normalise(vectors: FloatArray) -> FloatArray:
    """Rows scaled to unit length (in place when given float32)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    np.maximum(norms, np.float32(1e-12), out=norms)
    vectors /= norms
    return vectors


def expected_vector(text: str, *, model: str, task_type: str | None, dims: int | None, full_dims: int) -> FloatArray:
    """What a caller should receive from the worker for ``text``: the upstream vector, normalised."""
    vec = upstream_vector(text, model=model, task_type=task_type, dims=dims, full_dims=full_dims).copy()
    row: FloatArray = normalise(vec[None, :])[0]
    return row
