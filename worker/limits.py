"""Facts about the Gemini embedding API that the worker must respect, named once.

Sources (Gemini API docs, "Embeddings" guide and the ``models.batchEmbedContents`` reference):
- ``batchEmbedContents`` accepts at most 100 requests (texts) per call.
- gemini-embedding-001 takes up to 2,048 input tokens per text.
- Its output has 3,072 dimensions by default; ``output_dimensionality`` may ask for 128..3072 (the
  model is trained with Matryoshka representation learning, so shorter vectors are truncations).
- Only the full 3,072-dimension output comes normalised; "for other dimensions, you need to normalize
  the embeddings" (the guide's "Ensuring quality for smaller dimensions" section).
"""

from __future__ import annotations

MAX_TEXTS_PER_CALL = 100
MAX_TOKENS_PER_TEXT = 2048
MIN_OUTPUT_DIMENSIONS = 128  # for output_dimensionality; a model's own full size may be smaller
# Full (native) output dimension per model; vectors at this size come normalised from the API.
MODEL_DIMENSIONS: dict[str, int] = {
    "gemini-embedding-001": 3072,
    "text-embedding-004": 768,
    # Not a Gemini model: served only by the bundled emulator, so benchmarks can measure the cost of
    # moving messages without the cost of moving floats. A worker serves it only if ALLOWED_MODELS says so.
    "emulator-embedding-8d": 8,
}
DEFAULT_MODEL_DIMENSIONS = 3072

TASK_TYPES = frozenset(
    {
        "TASK_TYPE_UNSPECIFIED",
        "RETRIEVAL_QUERY",
        "RETRIEVAL_DOCUMENT",
        "SEMANTIC_SIMILARITY",
        "CLASSIFICATION",
        "CLUSTERING",
        "QUESTION_ANSWERING",
        "FACT_VERIFICATION",
        "CODE_RETRIEVAL_QUERY",
    }
)

# Tokens are estimated without a round trip to countTokens: about four characters per token for
# English text (Gemini docs, "Understand and count tokens"). The estimate only guards the worst
# cases; an upstream 400 for a text that slips through is still isolated to its own request.
CHARS_PER_TOKEN = 4


def full_dimensions(model: str) -> int:
    return MODEL_DIMENSIONS.get(model, DEFAULT_MODEL_DIMENSIONS)


def estimate_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)
