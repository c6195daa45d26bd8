"""What one embedding input is, what it costs, and how the REST API wants it. No AMQP, no SDK.

An input is a text (``str``: the common case, kept as a plain string so it costs nothing extra) or a ``Content``
of several parts (an image and its caption, a PDF, a video...), which yields ONE vector. ``parse_parts`` checks
parts against the model's facts (``limits.MODELS``): which media it takes, how many of each, PDF pages where they
can be counted. ``cost`` estimates an input's tokens (for UPSTREAM_TPM and UPSTREAM_MAX_TOKENS_PER_CALL) and its
bytes in the request body (for UPSTREAM_MAX_REQUEST_BYTES). Durations of audio and video are not parsed out of
the files: their token estimates assume the documented maximum (see ``limits``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from worker import limits
from worker.errors import InvalidRequest

# Bytes a request entry costs besides its content: {"model": "models/...", "content": {"parts": [...]},
# "taskType": ..., "outputDimensionality": ...}; generous, so that a budget is never overshot by the framing.
ENTRY_OVERHEAD = 160
PART_OVERHEAD = 48


@dataclass(frozen=True, slots=True)
class Part:
    """Exactly one of: ``text``; ``data`` (inline bytes) with ``mime_type``; ``file_uri`` with ``mime_type``."""

    text: str | None = None
    mime_type: str | None = None
    data: bytes | None = None
    file_uri: str | None = None


@dataclass(frozen=True, slots=True)
class Content:
    """An input of several parts; one vector. ``tokens`` and ``size`` are its estimated cost, fixed at parse time."""

    parts: tuple[Part, ...]
    tokens: int = field(default=0, compare=False)
    size: int = field(default=0, compare=False)
    usd: float = field(default=0.0, compare=False)  # estimated price at the model's sync rates (limits.PRICES)


EmbedInput = str | Content


def cost(item: EmbedInput) -> tuple[int, int]:
    """(estimated tokens, bytes in the request body) of one input."""
    if isinstance(item, str):
        return limits.estimate_tokens(item), len(item.encode("utf-8", "surrogatepass")) + ENTRY_OVERHEAD
    return item.tokens, item.size


def tokens(item: EmbedInput) -> int:
    return limits.estimate_tokens(item) if isinstance(item, str) else item.tokens


def usd(item: EmbedInput, model_name: str) -> float:
    """An input's estimated price, in dollars, at ``model_name``'s sync rates (the Batch API takes half)."""
    if isinstance(item, str):
        return limits.estimate_tokens(item) * limits.price(model_name, "text") / 1e6
    return item.usd


# ---------------------------------------------------------------------- parsing, per the model's facts
def parse_parts(raw: Any, where: str, model_name: str) -> Content:
    """``{"parts": [...]}``'s list, validated for ``model_name``. It stays a ``Content`` even when it is a single text
    part, so that it is sent as it is: ``with_task`` adds no instruction to it."""
    model = limits.model(model_name)
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest(f"{where}.parts must be a non-empty list of parts")
    parts = tuple(_part(p, f"{where}.parts.{j}", model_name, model) for j, p in enumerate(raw))
    counts = {"image": 0, "audio": 0, "video": 0, "pdf": 0}
    total_tokens, size, price = 0, ENTRY_OVERHEAD, 0.0
    for part in parts:
        part_tokens, part_size = _part_cost(part)
        total_tokens += part_tokens
        size += part_size
        kind = "text" if part.mime_type is None else _kind(part.mime_type)
        price += part_tokens * limits.price(model_name, kind) / 1e6
        if part.mime_type is not None:
            counts[kind] += 1
    for kind, allowed in (
        ("image", model.max_images),
        ("audio", model.max_audio),
        ("video", model.max_video),
        ("pdf", model.max_pdf),
    ):
        if counts[kind] > allowed:
            raise InvalidRequest(f"{where}: {counts[kind]} {kind} parts; {model_name} takes {allowed} per input")
    if total_tokens > model.max_tokens:
        raise InvalidRequest(f"{where} is about {total_tokens} tokens; {model_name} takes {model.max_tokens}")
    return Content(parts, tokens=total_tokens, size=size, usd=price)


def _part(raw: Any, where: str, model_name: str, model: limits.Model) -> Part:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise InvalidRequest(f'{where} must be an object with one of "text", "inline_data" or "file_data"')
    ((kind, value),) = raw.items()
    if kind == "text":
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequest(f"{where}.text must be a non-empty string")
        return Part(text=value)
    if kind not in ("inline_data", "file_data"):
        raise InvalidRequest(f'{where}: unknown part "{kind[:40]}" (expected "text", "inline_data" or "file_data")')
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where}.{kind} must be an object")
    mime = value.get("mime_type")
    if not isinstance(mime, str):
        raise InvalidRequest(f"{where}.{kind}.mime_type must be a string")
    mime = mime.lower()
    if not model.multimodal:
        raise InvalidRequest(f"model {model_name} takes text only; {where} is {mime[:60]} (gemini-embedding-2 does)")
    if mime not in model.media:
        accepted = ", ".join(sorted(model.media))
        raise InvalidRequest(f"{where}: {mime[:60]!r} is not a type {model_name} takes ({accepted})")
    if kind == "file_data":
        uri = value.get("file_uri")
        if set(value) != {"mime_type", "file_uri"} or not isinstance(uri, str) or not uri.strip():
            raise InvalidRequest(f'{where}.file_data must be {{"mime_type": ..., "file_uri": ...}}')
        return Part(mime_type=mime, file_uri=uri)
    data = value.get("data")
    if set(value) != {"mime_type", "data"} or not isinstance(data, str):
        raise InvalidRequest(f'{where}.inline_data must be {{"mime_type": ..., "data": "<base64>"}}')
    try:
        raw_bytes = base64.b64decode(data.translate(_NO_ASCII_SPACE), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{where}.inline_data.data is not valid base64") from None
    if not raw_bytes:
        raise InvalidRequest(f"{where}.inline_data.data is empty")
    if mime in limits.PDF_TYPES and model.max_pdf_pages and (pages := pdf_pages(raw_bytes)) > model.max_pdf_pages:
        raise InvalidRequest(f"{where}: a PDF of {pages} pages; {model_name} takes {model.max_pdf_pages}")
    return Part(mime_type=mime, data=raw_bytes)


# ASCII whitespace, dropped from inline data before it is decoded: base64 as the ``base64`` tool and
# ``base64.encodebytes`` write it has a line break every 76 characters. Upstream always gets plain base64
# (``rest_parts`` encodes the decoded bytes anew).
_NO_ASCII_SPACE = str.maketrans("", "", " \t\n\r\v\f")


def _kind(mime: str) -> str:
    if mime in limits.IMAGE_TYPES:
        return "image"
    if mime in limits.AUDIO_TYPES:
        return "audio"
    if mime in limits.VIDEO_TYPES:
        return "video"
    return "pdf"


def _part_cost(part: Part) -> tuple[int, int]:
    if part.text is not None:
        return limits.estimate_tokens(part.text), len(part.text.encode("utf-8", "surrogatepass")) + PART_OVERHEAD
    assert part.mime_type is not None
    kind = _kind(part.mime_type)
    if part.data is not None:
        size = 4 * -(-len(part.data) // 3) + len(part.mime_type) + PART_OVERHEAD
    else:
        size = len(part.file_uri or "") + len(part.mime_type) + PART_OVERHEAD
    if kind == "image":
        return image_tokens(part.data), size
    if kind == "audio":
        return limits.TOKENS_PER_AUDIO_SECOND * 180, size  # duration not parsed: the documented maximum
    if kind == "video":
        return limits.TOKENS_PER_VIDEO_FRAME * limits.MAX_VIDEO_FRAMES, size
    pages = pdf_pages(part.data) if part.data is not None else 6
    return limits.TOKENS_PER_PDF_PAGE * max(1, pages), size


def image_tokens(data: bytes | None) -> int:
    """258 tokens per 768x768 tile, from the PNG or JPEG header's size; one tile when the size is unknown."""
    size = image_size(data) if data is not None else None
    if size is None:
        return limits.TOKENS_PER_IMAGE_TILE
    width, height = size
    return limits.TOKENS_PER_IMAGE_TILE * max(1, -(-width // 768)) * max(1, -(-height // 768))


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or a JPEG SOF marker, without decoding the image."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
            if marker in (0xC0, 0xC1, 0xC2):
                height, width = struct.unpack(">HH", data[i + 5 : i + 9])
                return width, height
            i += 2 + length
    return None


_PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")
# A stream object's dictionary: what lies between "obj" and the "stream" keyword, never across another "obj" (so
# never past the object's "endobj"): linear time, whatever the bytes.
_STREAM_DICT = re.compile(rb"obj((?:(?!obj|stream).){0,4096})stream\r?\n", re.DOTALL)
_OBJECT_STREAM = re.compile(rb"/Type\s*/ObjStm\b")
_FLATE_ONLY = re.compile(rb"/Filter\s*(?:/FlateDecode|\[\s*/FlateDecode\s*\])")
# Decompressed bytes of a PDF's object streams read to count pages, all together (zlib holds about twice that while
# it decompresses): object streams are a few KiB each; past this, later streams are not counted (the API still
# counts every page).
PDF_OBJECT_STREAMS_MAX_BYTES = 4 * 1024 * 1024


def pdf_pages(data: bytes) -> int:
    """Page objects in a PDF (``/Type /Page``, not ``/Pages``), in the file and in its Flate-compressed object
    streams (PDF 1.5 and later: where many tools write their page objects): a count good
    enough for a page limit. Not counted: object streams with another filter or with predictors (``DecodeParms``),
    and those past ``PDF_OBJECT_STREAMS_MAX_BYTES`` decompressed."""
    pages = len(_PAGE.findall(data))
    budget = PDF_OBJECT_STREAMS_MAX_BYTES
    for match in _STREAM_DICT.finditer(data):
        if budget > 0 and _is_plain_object_stream(match.group(1)):
            objects = _inflated(data, match.end(), budget)
            budget -= len(objects)
            pages += len(_PAGE.findall(objects))
    return pages


def _is_plain_object_stream(stream_dict: bytes) -> bool:
    return bool(
        _OBJECT_STREAM.search(stream_dict) and _FLATE_ONLY.search(stream_dict) and b"/DecodeParms" not in stream_dict
    )


def _inflated(data: bytes, start: int, budget: int) -> bytes:
    """The Flate stream starting at ``start`` (up to the next "endstream"), decompressed to at most ``budget`` bytes;
    of a truncated stream what it holds, of bytes that are not Flate data nothing."""
    end = data.find(b"endstream", start)
    compressed = memoryview(data)[start : end if end >= 0 else len(data)]
    try:
        return zlib.decompressobj().decompress(compressed, budget)
    except zlib.error:
        return b""


# ---------------------------------------------------------------------- the REST form, and identity
def with_task(item: EmbedInput, model_name: str, task_type: str | None) -> EmbedInput:
    """For a model that takes its task in the prompt (gemini-embedding-2), a text input wrapped in the documented
    instruction for ``task_type``. Inputs of parts are left as they are: the guide gives no format for them."""
    if not task_type or not isinstance(item, str) or not limits.model(model_name).task_in_prompt:
        return item
    template = limits.TASK_INSTRUCTIONS.get(task_type)
    return template.format(item) if template else item


def api_task_type(model_name: str, task_type: str | None) -> str | None:
    """The ``taskType`` to send: none for a model that takes its task in the prompt."""
    return None if limits.model(model_name).task_in_prompt else task_type


def rest_parts(item: EmbedInput) -> list[dict[str, Any]]:
    """``content.parts`` of a batchEmbedContents request (the REST API's camelCase field names)."""
    if isinstance(item, str):
        return [{"text": item}]
    out: list[dict[str, Any]] = []
    for part in item.parts:
        if part.text is not None:
            out.append({"text": part.text})
        elif part.data is not None:
            out.append({"inlineData": {"mimeType": part.mime_type, "data": base64.b64encode(part.data).decode()}})
        else:
            out.append({"fileData": {"mimeType": part.mime_type, "fileUri": part.file_uri}})
    return out


def seed_parts(item: EmbedInput) -> list[tuple[str, str, bytes]]:
    """The input as (kind, mime type, payload) parts, the form ``vectors.seed_of`` (the emulator's vectors) reads."""
    if isinstance(item, str):
        return [("text", "", item.encode("utf-8", "surrogatepass"))]
    out = []
    for part in item.parts:
        if part.text is not None:
            out.append(("text", "", part.text.encode("utf-8", "surrogatepass")))
        elif part.data is not None:
            out.append(("inline", part.mime_type or "", part.data))
        else:
            out.append(("file", part.mime_type or "", (part.file_uri or "").encode()))
    return out


# A parts input's fingerprint starts with this tag: "c" for content, "2" for its encoding (length-prefixed fields;
# the first joined them with markers, and a text holding the markers collided with the parts it spelled out).
CONTENT_FINGERPRINT_TAG = b"c2"


def fingerprint(item: EmbedInput) -> bytes:
    """Everything that decides the vector of an input, as bytes, different for any two different inputs: "t" and
    the text (one string: unambiguous as it is, and unchanged since the first version), or ``CONTENT_FINGERPRINT_TAG``
    and a hash of every part, each field length-prefixed."""
    if isinstance(item, str):
        return b"t" + item.encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(digest_size=32)
    digest.update(struct.pack(">Q", len(item.parts)))
    for part in item.parts:
        for field_ in _part_fields(part):
            digest.update(struct.pack(">Q", len(field_)) + field_)
    return CONTENT_FINGERPRINT_TAG + digest.digest()


def _part_fields(part: Part) -> tuple[bytes, ...]:
    if part.text is not None:
        return b"t", part.text.encode("utf-8", "surrogatepass")
    mime = (part.mime_type or "").encode("utf-8", "surrogatepass")
    if part.data is not None:
        return b"d", mime, part.data
    return b"f", mime, (part.file_uri or "").encode("utf-8", "surrogatepass")
