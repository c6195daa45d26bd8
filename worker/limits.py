"""Facts about the Gemini embedding API that the worker must respect, named once, with their sources.

Sources (looked up for this table; re-check them when Google updates the models):
- Gemini API "Embeddings" guide (ai.google.dev/gemini-api/docs/embeddings) and the ``models.batchEmbedContents``
  reference: at most 100 requests per call; output 128..3072 dimensions (Matryoshka-trained: shorter vectors are
  truncations), full size 3,072; "for other dimensions, you need to normalize the embeddings".
- gemini-embedding-001: text only, 2,048 input tokens per text.
- gemini-embedding-2 (GA 2026-04-22; model page and embeddings guide): 8,192 input tokens per input overall;
  images PNG/JPEG, "maximum of 6 images per request"; audio MP3/WAV up to 180 s; video MP4/MOV up to 120 s (at
  most 32 frames are sampled); PDF up to 6 pages. Parts of one content yield ONE embedding. "You cannot use the
  task_type field for the gemini-embedding-2 model. Instead, include the task as an instruction in your prompt",
  in the formats of ``TASK_INSTRUCTIONS``. Vertex AI accepts more image types; the Gemini API guide lists these.
- Token counts of media for embeddings are not documented. The estimates here (``TOKENS_PER_*``) come from
  generateContent's accounting (258 tokens per 768x768 image tile) and from the embedding price table (an
  image at $0.00012 and $0.45 per M tokens is ~258 tokens; video at $0.00079 per frame and $12 per M is ~66 tokens
  per frame; audio at $0.00016 per second and $6.50 per M is ~25 tokens per second). They feed UPSTREAM_TPM
  and the per-call token budget; the API's own count is what it bills.
- Prices (Gemini API pricing page, ai.google.dev/gemini-api/docs/pricing, paid tier, per million input tokens):
  gemini-embedding-001 $0.15; gemini-embedding-2 text $0.20, image $0.45, audio $6.50, video $12.00; the Batch API
  half of these. PDF pages are not priced separately: they are read as images (258 tokens a page), so they are
  priced as images here. A model not in the table is priced as gemini-embedding-2's text (the dearest text rate),
  the emulator's own model at nothing. These feed UPSTREAM_USD_LIMIT and ``embed_spend_usd_total``: estimates from
  the worker's token estimate; the API's own token count is what Google bills.
- Tier 1 limits (rate-limits page): 3,000 requests and 1M tokens per minute for embeddings; a spend cap of $10 per
  rolling 10 minutes, which a 429 reports only once it is reached (UPSTREAM_USD_LIMIT keeps under it).
- Request payload: a limit of 4,194,304 bytes has been reported for embedding calls ("Request payload size exceeds
  the limit"); the inline-data guide documents larger ones for generateContent. UPSTREAM_MAX_REQUEST_BYTES
  defaults to the smallest.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_TEXTS_PER_CALL = 100  # requests (inputs) in one batchEmbedContents call
MAX_TOKENS_PER_TEXT = 2048  # gemini-embedding-001
MIN_OUTPUT_DIMENSIONS = 128  # for output_dimensionality; a model's own full size may be smaller
DEFAULT_MODEL_DIMENSIONS = 3072
MAX_REQUEST_BYTES = 4_194_304  # the smallest payload limit reported for embedding calls

IMAGE_TYPES = frozenset({"image/png", "image/jpeg"})
AUDIO_TYPES = frozenset({"audio/mpeg", "audio/mp3", "audio/wav", "audio/x-wav"})
VIDEO_TYPES = frozenset({"video/mp4", "video/quicktime"})
PDF_TYPES = frozenset({"application/pdf"})


@dataclass(frozen=True, slots=True)
class Model:
    full_dimensions: int
    max_tokens: int  # per input (all its parts together)
    media: frozenset[str] = frozenset()  # mime types its parts may carry; empty = text only
    max_images: int = 0  # per input
    max_audio: int = 0
    max_video: int = 0
    max_pdf: int = 0
    max_pdf_pages: int = 0
    task_in_prompt: bool = False  # task_type goes into the text as an instruction, never as taskType

    @property
    def multimodal(self) -> bool:
        return bool(self.media)


MODELS: dict[str, Model] = {
    "gemini-embedding-001": Model(3072, MAX_TOKENS_PER_TEXT),
    "gemini-embedding-2": Model(
        3072,
        8192,
        media=IMAGE_TYPES | AUDIO_TYPES | VIDEO_TYPES | PDF_TYPES,
        max_images=6,
        max_audio=1,
        max_video=1,
        max_pdf=1,
        max_pdf_pages=6,
        task_in_prompt=True,
    ),
    "text-embedding-004": Model(768, MAX_TOKENS_PER_TEXT),
    # Not a Gemini model: served only by the bundled emulator, so benchmarks can measure the cost of moving
    # messages without the cost of moving floats. A worker serves it only if ALLOWED_MODELS says so.
    "emulator-embedding-8d": Model(8, MAX_TOKENS_PER_TEXT),
}
# Models a worker serves without ALLOWED_MODELS naming them (besides GEMINI_MODEL).
SERVED_BY_DEFAULT = frozenset({"gemini-embedding-001", "gemini-embedding-2"})
_UNKNOWN = Model(DEFAULT_MODEL_DIMENSIONS, MAX_TOKENS_PER_TEXT)

# gemini-embedding-2's documented task instructions (embeddings guide, "Task types"); {} is the input text.
TASK_INSTRUCTIONS = {
    "RETRIEVAL_QUERY": "task: search result | query: {}",
    "RETRIEVAL_DOCUMENT": "title: none | text: {}",
    "QUESTION_ANSWERING": "task: question answering | query: {}",
    "FACT_VERIFICATION": "task: fact checking | query: {}",
    "CODE_RETRIEVAL_QUERY": "task: code retrieval | query: {}",
    "CLASSIFICATION": "task: classification | query: {}",
    "CLUSTERING": "task: clustering | query: {}",
    "SEMANTIC_SIMILARITY": "task: sentence similarity | query: {}",
}

TASK_TYPES = frozenset({"TASK_TYPE_UNSPECIFIED", *TASK_INSTRUCTIONS})

# Tokens are estimated without a round trip to countTokens: about four characters per token for
# English text (Gemini docs, "Understand and count tokens"). The estimate only guards the worst
# cases; an upstream 400 for a text that slips through is still isolated to its own request.
CHARS_PER_TOKEN = 4
TOKENS_PER_IMAGE_TILE = 258  # one 768x768 tile (generateContent); a small image is one tile
TOKENS_PER_AUDIO_SECOND = 25
TOKENS_PER_VIDEO_FRAME = 66
MAX_VIDEO_FRAMES = 32  # gemini-embedding-2 samples at most this many frames
TOKENS_PER_PDF_PAGE = 258


# USD per million input tokens, by model and by what a part carries (see the sources above).
PRICES: dict[str, dict[str, float]] = {
    "gemini-embedding-001": {"text": 0.15},
    "gemini-embedding-2": {"text": 0.20, "image": 0.45, "audio": 6.50, "video": 12.00, "pdf": 0.45},
    "text-embedding-004": {"text": 0.15},
    "emulator-embedding-8d": {"text": 0.0},
}
BATCH_API_DISCOUNT = 0.5  # the Batch API's price, as a share of the sync one
_UNKNOWN_PRICE = 0.20


def price(model_name: str, kind: str = "text") -> float:
    """USD per million input tokens of ``kind`` ("text", "image", "audio", "video", "pdf") on ``model_name``."""
    rates = PRICES.get(model_name)
    if rates is None:
        return _UNKNOWN_PRICE
    return rates.get(kind, rates["text"])


def model(name: str) -> Model:
    return MODELS.get(name, _UNKNOWN)


def full_dimensions(name: str) -> int:
    return model(name).full_dimensions


def estimate_tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)
