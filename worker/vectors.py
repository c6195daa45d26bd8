"""Deterministic synthetic embeddings, shared by the emulator and by tests that check replies.

``full_vector`` derives a unit vector from (model, task_type, text) with a seeded generator, so the
same text always gets the same vector and different texts get different ones. Shorter outputs are
the first ``dims`` components, as with Gemini's Matryoshka-trained models; like the real API, the
emulator returns those *unnormalised*, and the worker must normalise them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import orjson

# Float32 vectors, one (dims,) or many (count, dims): the one array type the package passes around.
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class JsonVector:
    """One vector as the API wrote it: its JSON array (``[n,n,...]``, no whitespace), numbers as the API formatted
    them. A JSON reply splices it in unparsed (``messages.encode_vectors``): at 3,072 dimensions parsing, making
    float32 and formatting again cost more than the rest of the worker (README, performance). ``array`` parses it
    when numbers are needed: a float32 reply, a cache write, the deferred lane's store. ``text`` may be a view into
    the API's response body, which it keeps alive: hold one only until its reply is out (``as_array`` copies)."""

    text: bytes | memoryview

    def array(self) -> FloatArray:
        # orjson to float64, then float32: exactly what parsing the whole response did, to the last bit
        return np.array(orjson.loads(self.text), dtype=np.float32)


# One vector of an outcome: parsed (normalised below full size, from the cache, from a fake) or as the API wrote it.
Vector = FloatArray | JsonVector


def as_array(vector: Vector) -> FloatArray:
    """The vector's float32 numbers (parsed from its JSON when it has not been)."""
    return vector.array() if isinstance(vector, JsonVector) else vector


def stack(vectors: FloatArray | Sequence[Vector]) -> FloatArray:
    """Vectors as one (count, dims) float32 array, parsing those that need it."""
    if isinstance(vectors, np.ndarray):
        return vectors
    return np.stack([as_array(v) for v in vectors])


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
