"""An input's fingerprint (the cache key's content) is unambiguous: no two different inputs share one, whatever
their texts hold (issue 17, item 5). Plain texts keep the fingerprint, and so the cache keys, they always had."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st

from worker.frugal import cache_key
from worker.inputs import Content, EmbedInput, Part, fingerprint
from worker.messages import EmbedConfig

CFG = EmbedConfig("gemini-embedding-2", "RETRIEVAL_DOCUMENT", 768)
CAT = Part(mime_type="image/png", file_uri="gs://b/cat.png")


def content(*parts: Part) -> Content:
    return Content(parts)


def test_a_text_part_holding_a_files_markers_is_not_that_file() -> None:
    joined = content(Part(text="x"), Part(text="cap\x00fimage/png\x00gs://b/cat.png"))
    split = content(Part(text="x"), Part(text="cap"), CAT)
    assert fingerprint(joined) != fingerprint(split)
    assert cache_key("p:", CFG, joined) != cache_key("p:", CFG, split)


def test_a_text_part_holding_a_marker_is_not_two_text_parts() -> None:
    assert fingerprint(content(Part(text="a\x00tb"))) != fingerprint(content(Part(text="a"), Part(text="b")))


def test_a_mime_type_and_its_payload_keep_their_boundary() -> None:
    one = content(Part(mime_type="image/png", data=b"\x00abc"))
    other = content(Part(mime_type="image/png\x00", data=b"abc"))
    assert fingerprint(one) != fingerprint(other)


def test_plain_text_fingerprints_and_cache_keys_are_unchanged() -> None:
    """Text inputs were never ambiguous (one string, nothing joined): their cached vectors stay valid."""
    assert fingerprint("hello") == b"thello"
    identity = b"gemini-embedding-2\x00RETRIEVAL_DOCUMENT\x00768\x00"
    digest = hashlib.blake2b(identity + b"thello", digest_size=20).hexdigest()
    assert cache_key("p:", CFG, "hello") == f"p:cache:{digest}"


def old_fingerprint(item: Content) -> bytes:
    """The first encoding (markers, no lengths), to show its cache entries are never read again."""
    digest = hashlib.blake2b(digest_size=32)
    for part in item.parts:
        if part.text is not None:
            digest.update(b"\x00t" + part.text.encode())
        elif part.data is not None:
            digest.update(b"\x00d" + (part.mime_type or "").encode() + b"\x00" + part.data)
        else:
            digest.update(b"\x00f" + (part.mime_type or "").encode() + b"\x00" + (part.file_uri or "").encode())
    return b"c" + digest.digest()


# Small alphabets holding the old markers, so that near-collisions are likely.
_TEXT = st.text(alphabet="at\x00f/", min_size=1, max_size=6)
_PART = st.one_of(
    st.builds(Part, text=_TEXT),
    st.builds(Part, mime_type=_TEXT, data=st.binary(min_size=1, max_size=4)),
    st.builds(Part, mime_type=_TEXT, file_uri=_TEXT),
)
_CONTENT = st.lists(_PART, min_size=1, max_size=4).map(lambda parts: Content(tuple(parts)))
_INPUT: st.SearchStrategy[EmbedInput] = st.one_of(_TEXT, _CONTENT)


@given(_CONTENT)
def test_old_entries_of_parts_inputs_are_never_read(item: Content) -> None:
    old = hashlib.blake2b(
        b"gemini-embedding-2\x00RETRIEVAL_DOCUMENT\x00768\x00" + old_fingerprint(item), digest_size=20
    )
    assert cache_key("p:", CFG, item) != f"p:cache:{old.hexdigest()}"


@given(_INPUT, _INPUT)
def test_different_inputs_never_share_a_fingerprint(one: EmbedInput, other: EmbedInput) -> None:
    assert (fingerprint(one) == fingerprint(other)) == (one == other)


def _encoded(part: Part) -> str:
    """A part as the first encoding wrote it, after its "\\x00t" (as the rest of a text part)."""
    if part.text is not None:
        return "\x00t" + part.text
    if part.data is not None:
        return "\x00d" + (part.mime_type or "") + "\x00" + part.data.decode("latin-1")
    return "\x00f" + (part.mime_type or "") + "\x00" + (part.file_uri or "")


@given(st.lists(_PART, min_size=2, max_size=4), st.data())
def test_parts_folded_into_a_text_part_are_a_different_input(parts: list[Part], data: st.DataObject) -> None:
    """The shape that used to collide: a text part that spells out the parts after it."""
    i = data.draw(st.integers(0, len(parts) - 2))
    head = Part(text=parts[i].text if parts[i].text is not None else "x")
    split = Content((*parts[:i], head, *parts[i + 1 :]))
    folded_text = (head.text or "") + "".join(_encoded(p) for p in split.parts[i + 1 :])
    folded = Content((*split.parts[:i], Part(text=folded_text)))
    assert split != folded
    assert fingerprint(split) != fingerprint(folded)
