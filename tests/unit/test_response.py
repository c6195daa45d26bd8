"""embedders/response.py: full-size vectors cut out of the API's response unparsed, and the replies built from them
hold the very numbers the parsed path gives, in compact and in indented (as the real API writes) bodies."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from worker.embedders.response import read_embeddings, splice_embeddings
from worker.messages import decode_reply, encode_vectors
from worker.vectors import JsonVector, as_array, full_vector

DIMS = 64


def _rows(count: int, dims: int = DIMS) -> np.ndarray:
    return np.stack([full_vector(f"text {i}", model="m", task_type=None, dims=dims) for i in range(count)])


def _body(rows: np.ndarray, *, indent: bool = False, **extra: object) -> bytes:
    option = orjson.OPT_SERIALIZE_NUMPY | (orjson.OPT_INDENT_2 if indent else 0)
    return orjson.dumps({"embeddings": [{"values": r} for r in rows], **extra}, option=option)


@pytest.mark.parametrize("indent", [False, True], ids=["compact", "indented"])
def test_spliced_vectors_are_the_parsed_ones(indent: bool) -> None:
    rows = _rows(5)
    vectors = splice_embeddings(_body(rows, indent=indent), 5, DIMS)
    assert vectors is not None and all(isinstance(v, JsonVector) for v in vectors)
    np.testing.assert_array_equal(np.stack([v.array() for v in vectors]), rows)
    assert all(b" " not in bytes(v.text) and b"\n" not in bytes(v.text) for v in vectors)


@pytest.mark.parametrize("indent", [False, True], ids=["compact", "indented"])
def test_a_spliced_reply_decodes_to_the_parsed_replys_vectors(indent: bool) -> None:
    rows = _rows(3)
    vectors = splice_embeddings(_body(rows, indent=indent), 3, DIMS)
    assert vectors is not None
    spliced = encode_vectors(vectors, "m", dimensions=DIMS)
    parsed = encode_vectors(rows, "m")
    assert orjson.loads(spliced.body) == orjson.loads(parsed.body)  # same numbers, same keys, same order
    np.testing.assert_array_equal(decode_reply(spliced.body, spliced.content_type, spliced.headers, count=3), rows)


def test_a_reply_may_mix_spliced_and_parsed_vectors() -> None:
    rows = _rows(3)
    spliced = splice_embeddings(_body(rows), 3, DIMS)
    assert spliced is not None
    mixed = [spliced[0], rows[1], spliced[2]]  # e.g. a cache hit between two fresh vectors
    reply = encode_vectors(mixed, "m", dimensions=DIMS)
    np.testing.assert_array_equal(decode_reply(reply.body, reply.content_type, reply.headers, count=3), rows)
    binary = encode_vectors(mixed, "m", "float32", dimensions=DIMS)
    np.testing.assert_array_equal(decode_reply(binary.body, binary.content_type, binary.headers, count=3), rows)


def _replace_first(body: bytes, old: bytes, new: bytes) -> bytes:
    assert old in body
    return body.replace(old, new, 1)


@pytest.mark.parametrize(
    "body_of",
    [
        pytest.param(lambda b: _replace_first(b, b",", b",,"), id="empty number"),
        pytest.param(lambda b: _replace_first(b, b"[{", b'[{"x":null,'), id="extra key"),
        pytest.param(lambda b: _replace_first(b, b'"values":[', b'"values":["1",'), id="string in a vector"),
        pytest.param(lambda b: _replace_first(b, b'"values":[', b'"values":[NaN,'), id="NaN"),
        pytest.param(lambda b: _replace_first(b, b'"values":[', b'"values":[[1],'), id="nested"),
        pytest.param(lambda b: b[: b.rindex(b",")] + b"]}]}", id="one number short"),
        pytest.param(lambda b: _replace_first(b, b'"values":[', b'"values":[0.5,'), id="one number long"),
        pytest.param(lambda b: _replace_first(b, b'"values"', b'"valuse"'), id="another key"),
    ],
)
def test_a_body_off_the_documented_shape_is_not_spliced(body_of: object) -> None:
    body = body_of(_body(_rows(3)))  # type: ignore[operator]
    assert splice_embeddings(body, 3, DIMS) is None


def test_a_count_other_than_the_inputs_is_not_spliced() -> None:
    body = _body(_rows(3))
    assert splice_embeddings(body, 2, DIMS) is None
    assert splice_embeddings(body, 4, DIMS) is None
    assert splice_embeddings(body, 3, DIMS + 1) is None
    assert splice_embeddings(b'{"embeddings":[]}', 0, DIMS) is None


def test_fields_beside_the_embeddings_fall_back_to_the_strict_parse() -> None:
    rows = _rows(2)
    body = _body(rows, usageMetadata={"promptTokenCount": 7})
    assert splice_embeddings(body, 2, DIMS) is None
    parsed = read_embeddings(body, 2, DIMS, splice=True)
    assert isinstance(parsed, np.ndarray)
    np.testing.assert_array_equal(parsed, rows)


def test_without_splice_the_body_is_parsed() -> None:
    rows = _rows(2)
    parsed = read_embeddings(_body(rows), 2, DIMS, splice=False)
    assert isinstance(parsed, np.ndarray) and parsed.dtype == np.float32
    np.testing.assert_array_equal(parsed, rows)


def test_a_compact_body_is_viewed_not_copied_and_parsed_on_demand() -> None:
    rows = _rows(1)
    vectors = splice_embeddings(_body(rows), 1, DIMS)
    assert vectors is not None and isinstance(vectors[0].text, memoryview)
    array = as_array(vectors[0])
    assert array.dtype == np.float32
    np.testing.assert_array_equal(array, rows[0])
