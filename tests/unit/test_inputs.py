"""Inputs of parts: base64 as tools write it, PDF pages however the file stores them, and what goes upstream."""

from __future__ import annotations

import base64
import io
import struct
import tracemalloc
import zlib
from typing import Any

import orjson
import pytest

from worker import inputs
from worker.errors import InvalidRequest
from worker.inputs import Content, Part
from worker.messages import EmbedRequest, RequestLimits, decode_request

G2 = "gemini-embedding-2"
LIMITS = RequestLimits(
    default_model=G2,
    models=frozenset({G2, "gemini-embedding-001"}),
    max_body_bytes=1024 * 1024,
    max_texts=50,
    max_tokens_per_text=None,
)
IHDR = b"IHDR" + struct.pack(">IIBBBBB", 640, 480, 8, 2, 0, 0, 0)
PNG = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + IHDR + struct.pack(">I", zlib.crc32(IHDR)) + bytes(range(256)) * 20
PLAIN = base64.b64encode(PNG).decode()


def decode(body: dict[str, Any]) -> EmbedRequest:
    return decode_request(orjson.dumps(body), content_type=None, headers=None, request_limits=LIMITS)


def inline(data: str, mime: str = "image/png") -> list[dict[str, Any]]:
    return [{"inline_data": {"mime_type": mime, "data": data}}]


# ---------------------------------------------------------------- base64 as tools write it
@pytest.mark.parametrize(
    "data",
    [
        base64.encodebytes(PNG).decode(),  # a line break every 76 characters, and one at the end
        base64.encodebytes(PNG).decode().replace("\n", "\r\n"),  # the same from a Windows tool
        " ".join(PLAIN[i : i + 4] for i in range(0, len(PLAIN), 4)) + "\t",
    ],
    ids=["encodebytes", "crlf", "spaces-and-tab"],
)
def test_base64_with_ascii_whitespace_is_taken_and_sent_plain(data: str) -> None:
    assert "\n" in data or " " in data
    item = inputs.parse_parts(inline(data), "inputs.0", G2)
    assert item.parts[0].data == PNG
    [sent] = inputs.rest_parts(item)
    assert sent["inlineData"]["data"] == PLAIN  # what the API takes: no whitespace


@pytest.mark.parametrize(
    "data", ["aGk=\u00a0", "aG\u2028k=", "%%%", "aGk"], ids=["nbsp", "unicode-line", "junk", "pad"]
)
def test_other_base64_is_still_refused(data: str) -> None:
    with pytest.raises(InvalidRequest, match="not valid base64"):
        inputs.parse_parts(inline(data), "inputs.0", G2)


# ---------------------------------------------------------------- PDF pages
def pdf(*objects: bytes) -> bytes:
    """A PDF of these objects, numbered from 1 (no cross-reference table: the page count does not read one)."""
    body = b"".join(b"%d 0 obj\n%s\nendobj\n" % (i, obj) for i, obj in enumerate(objects, 1))
    return b"%PDF-1.5\n" + body + b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"


def object_stream(contents: bytes, extra: bytes = b"", *, length: bytes | None = None) -> bytes:
    """A Flate-compressed object stream holding ``contents`` (its header of object offsets left out: it is not read)."""
    data = zlib.compress(contents)
    length = length if length is not None else str(len(data)).encode()
    return b"<< /Type /ObjStm /N 3 /First 0 /Length %s /Filter /FlateDecode %s>>\nstream\n%s\nendstream" % (
        length,
        extra,
        data,
    )


PAGES_3 = b"<< /Type /Page /Parent 2 0 R >> << /Type/Page /Parent 2 0 R >> << /Type /Page >> << /Type /Pages >>"


def test_pages_inside_object_streams_are_counted() -> None:
    catalog = b"<< /Type /Catalog /Pages 2 0 R >>"
    assert inputs.pdf_pages(pdf(catalog, b"<< /Type /Page >>")) == 1  # as before: pages in the file itself
    assert inputs.pdf_pages(pdf(catalog, object_stream(PAGES_3))) == 3
    assert inputs.pdf_pages(pdf(catalog, object_stream(PAGES_3, length=b"9 0 R"), object_stream(PAGES_3))) == 6
    assert inputs.pdf_pages(pdf(catalog, b"<< /Filter [ /FlateDecode ] /Type /ObjStm >>\nstream\r\n"
                                + zlib.compress(PAGES_3) + b"\r\nendstream")) == 3  # fmt: skip


def test_what_is_not_counted_is_what_the_docstring_says() -> None:
    """Object streams with predictors, and another filter, are left out (the API still counts their pages)."""
    predicted = object_stream(PAGES_3, b"/DecodeParms << /Predictor 12 /Columns 4 >> ")
    assert inputs.pdf_pages(pdf(predicted)) == 0
    other = object_stream(PAGES_3).replace(b"/FlateDecode", b"/LZWDecode")
    assert inputs.pdf_pages(pdf(other)) == 0
    broken = object_stream(PAGES_3).replace(b"stream\nx", b"stream\ny")  # not Flate data
    assert inputs.pdf_pages(pdf(broken, b"<< /Type /Page >>")) == 1


def test_object_streams_are_decompressed_within_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    budget = 1024 * 1024
    monkeypatch.setattr(inputs, "PDF_OBJECT_STREAMS_MAX_BYTES", budget)
    bomb = object_stream(bytes(64 * budget))  # 64 MiB of zeros in about 64 KiB
    late = object_stream(PAGES_3)  # past the budget: not read
    data = pdf(object_stream(PAGES_3), bomb, late)
    tracemalloc.start()
    try:
        pages = inputs.pdf_pages(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pages == 3
    # zlib assembles its output from blocks, so it holds about twice the output at its peak
    assert peak < 2.5 * budget, f"counting pages held {peak} bytes"


def test_a_pdf_written_with_object_streams_by_a_real_tool() -> None:
    pikepdf = pytest.importorskip("pikepdf")  # builds the file only; the worker reads PDFs without it

    def written(pages: int) -> bytes:
        document = pikepdf.new()
        for _ in range(pages):
            document.add_blank_page()
        out = io.BytesIO()
        document.save(out, object_stream_mode=pikepdf.ObjectStreamMode.generate)
        return out.getvalue()

    six, seven = written(6), written(7)
    assert b"/ObjStm" in seven and b"/Type /Page " not in seven  # the pages are only inside the object stream
    assert inputs.pdf_pages(six) == 6 and inputs.pdf_pages(seven) == 7
    taken = inputs.parse_parts(inline(base64.b64encode(six).decode(), "application/pdf"), "inputs.0", G2)
    assert taken.tokens == 6 * 258
    with pytest.raises(InvalidRequest, match=f"a PDF of 7 pages; {G2} takes 6"):
        inputs.parse_parts(inline(base64.b64encode(seven).decode(), "application/pdf"), "inputs.0", G2)


# ---------------------------------------------------------------- parts are sent as they are
def test_a_text_part_gets_no_task_instruction_where_a_text_does() -> None:
    """README: inputs of parts are sent as they are; only text inputs get gemini-embedding-2's instruction."""
    request = decode({"task_type": "RETRIEVAL_QUERY", "inputs": [{"parts": [{"text": "cats"}]}, {"text": "cats"}]})
    as_part, as_text = request.inputs
    assert as_part == Content((Part(text="cats"),))
    assert inputs.rest_parts(inputs.with_task(as_part, G2, "RETRIEVAL_QUERY")) == [{"text": "cats"}]
    assert inputs.rest_parts(inputs.with_task(as_text, G2, "RETRIEVAL_QUERY")) == [
        {"text": "task: search result | query: cats"}
    ]
    assert inputs.fingerprint(as_part) != inputs.fingerprint(as_text)  # so the cache never mixes their vectors


def test_a_text_part_is_checked_like_other_parts_and_never_cut() -> None:
    long_text = "word " * 7000  # about 8,750 tokens: over gemini-embedding-2's 8,192
    with pytest.raises(InvalidRequest, match=r"inputs\.0 is about 8750 tokens"):
        decode({"truncate": True, "inputs": [{"parts": [{"text": long_text}]}]})
    assert decode({"truncate": True, "inputs": [{"text": long_text}]}).inputs == [long_text[: 8192 * 4]]
    short = decode({"model": "gemini-embedding-001", "inputs": [{"parts": [{"text": "a"}]}]}).inputs[0]
    assert isinstance(short, Content) and inputs.cost(short)[0] == 1
