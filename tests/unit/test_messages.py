"""Request decoding and reply encoding."""

from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.errors import ErrorCode, InvalidRequest
from worker.messages import (
    ERROR_REPLY_MAX_BYTES,
    EmbedRequest,
    ErrorReply,
    MalformedReply,
    RequestLimits,
    decode_deferred,
    decode_flush_reply,
    decode_reply,
    decode_request,
    encode_error,
    encode_flush_reply,
    encode_request,
    encode_vectors,
    reply_bytes,
)

LIMITS = RequestLimits(
    default_model="gemini-embedding-001",
    models=frozenset({"gemini-embedding-001", "text-embedding-004"}),
    max_body_bytes=64 * 1024,
    max_texts=50,
    max_tokens_per_text=100,
)


def decode(
    body: Any, headers: dict[str, Any] | None = None, content_type: str | None = "application/json"
) -> EmbedRequest:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return decode_request(raw, content_type=content_type, headers=headers, request_limits=LIMITS)


def test_texts_and_defaults() -> None:
    req = decode({"texts": ["a", "b"]})
    assert req.inputs == ["a", "b"]
    assert req.config.model == "gemini-embedding-001"
    assert req.config.task_type is None and req.config.output_dimensionality is None
    assert req.config.dimensions == 3072


def test_single_text_and_full_config() -> None:
    req = decode(
        {
            "text": "hi",
            "model": "models/gemini-embedding-001",
            "task_type": "retrieval_query",
            "output_dimensionality": 768,
        }
    )
    assert req.inputs == ["hi"]
    assert (req.config.model, req.config.task_type, req.config.output_dimensionality) == (
        "gemini-embedding-001",
        "RETRIEVAL_QUERY",
        768,
    )


def test_full_dimension_shares_the_default_config() -> None:
    assert decode({"text": "a", "output_dimensionality": 3072}).config == decode({"text": "a"}).config


def test_deadline_header_in_epoch_millis() -> None:
    assert decode({"text": "a"}, {"x-deadline": 1_700_000_000_123}).deadline == pytest.approx(1_700_000_000.123)
    assert decode({"text": "a"}, {"x-deadline": b"1700000000000"}).deadline == pytest.approx(1_700_000_000)


@pytest.mark.parametrize(
    ("body", "headers", "content_type", "fragment"),
    [
        (b"not json", None, "application/json", "not valid JSON"),
        (b"[1, 2]", None, "application/json", "must be a JSON object"),
        ({}, None, "application/json", 'missing "texts"'),
        ({"texts": []}, None, "application/json", "empty"),
        ({"texts": ["a", 3]}, None, "application/json", "texts.1"),
        ({"texts": "abc"}, None, "application/json", "texts"),
        ({"text": "a", "texts": ["b"]}, None, "application/json", "not both"),
        ({"texts": ["  "]}, None, "application/json", "text 0 is empty"),
        ({"texts": ["x" * 401]}, None, "application/json", "truncate"),
        ({"texts": ["a"] * 51}, None, "application/json", "limit is 50"),
        ({"text": "a", "model": "gpt-4"}, None, "application/json", "unknown model"),
        ({"text": "a", "task_type": "DANCING"}, None, "application/json", "unknown task_type"),
        ({"text": "a", "output_dimensionality": 64}, None, "application/json", "between 128 and 3072"),
        (
            {"text": "a", "output_dimensionality": 1024, "model": "text-embedding-004"},
            None,
            "application/json",
            "between 128 and 768",
        ),
        ({"text": "a", "output_dimensionality": "768"}, None, "application/json", "output_dimensionality"),
        ({"text": "a", "colour": "red"}, None, "application/json", "colour"),
        ({"text": "a"}, {"x-deadline": "soon"}, "application/json", "x-deadline"),
        ({"text": "a"}, None, "text/plain", "content_type"),
        (b"{" + b" " * 70_000 + b"}", None, "application/json", "limit is 65536"),
    ],
)
def test_bad_requests_get_a_clear_message(body: Any, headers: Any, content_type: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode(body, headers, content_type)
    assert fragment in info.value.message
    assert info.value.code == ErrorCode.INVALID_REQUEST and not info.value.retryable


def test_truncate_cuts_only_overlong_texts() -> None:
    req = decode({"texts": ["short", "y" * 1000], "truncate": True})
    assert req.inputs == ["short", "y" * 400]


def test_replies_round_trip_through_the_documented_schemas() -> None:
    vectors = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    reply = encode_vectors(vectors, "gemini-embedding-001")
    document = orjson.loads(reply.body)
    assert document["dimensions"] == 8 and document["model"] == "gemini-embedding-001"
    assert np.array_equal(decode_reply(reply.body, reply.content_type, None, count=3), vectors)  # exact float32
    with pytest.raises(ErrorReply) as err:
        decode_reply(encode_error(InvalidRequest("nope")).body, "application/json", None)
    assert (err.value.code, err.value.message, err.value.retryable) == ("invalid_request", "nope", False)
    binary = encode_vectors(vectors, "gemini-embedding-001", "float32")
    assert binary.content_type == "application/x-embeddings-float32" and len(binary.body) == 3 * 8 * 4
    assert np.array_equal(decode_reply(binary.body, binary.content_type, binary.headers), vectors)
    assert decode_flush_reply(encode_flush_reply(7).body) == 7


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1]", b'{"embeddings": "x"}', b'{"embeddings": [1, 2]}', b'{"error": "x"}', b"{}"],
)
def test_malformed_replies_are_named_as_such(body: bytes) -> None:
    with pytest.raises(MalformedReply):
        decode_reply(body, "application/json", None)


def test_a_reply_with_the_wrong_number_of_vectors_is_malformed() -> None:
    reply = encode_vectors(np.zeros((2, 8), np.float32), "m")
    with pytest.raises(MalformedReply, match="2 vectors for 3 texts"):
        decode_reply(reply.body, reply.content_type, None, count=3)


def test_the_caller_encoding_is_what_the_worker_decodes() -> None:
    body = encode_request(["a", "b"], task_type="CLUSTERING", output_dimensionality=256, reply_encoding="float32")
    req = decode_request(body, content_type="application/json", headers=None, request_limits=LIMITS)
    assert req.inputs == ["a", "b"] and req.reply_encoding == "float32"
    assert (req.config.task_type, req.config.output_dimensionality) == ("CLUSTERING", 256)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "texts": st.one_of(st.lists(st.text(max_size=500), max_size=60), json_values),
        "text": st.one_of(st.text(max_size=500), json_values),
        "model": st.one_of(st.sampled_from(["gemini-embedding-001", "text-embedding-004", "x"]), json_values),
        "task_type": st.one_of(st.sampled_from(["RETRIEVAL_QUERY", "clustering", "NOPE"]), json_values),
        "output_dimensionality": st.one_of(st.integers(-10, 5000), json_values),
        "truncate": st.one_of(st.booleans(), json_values),
    },
)
bodies = st.one_of(
    st.binary(max_size=300),
    # stdlib json so that integers beyond 64 bits reach the decoder too
    json_values.map(lambda v: json.dumps(v).encode()),
    request_like.map(lambda v: json.dumps(v).encode()),
)
header_maps = st.one_of(
    st.none(),
    st.dictionaries(
        st.sampled_from(["x-deadline", "other"]),
        st.one_of(st.integers(), st.floats(), st.text(max_size=20), st.binary(max_size=20), st.none()),
        max_size=2,
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies, headers=header_maps, content_type=st.sampled_from([None, "application/json", "text/plain", ""]))
def test_any_body_and_headers_give_a_valid_request_or_a_clean_error(
    body: bytes, headers: Any, content_type: Any
) -> None:
    try:
        req = decode_request(body, content_type=content_type, headers=headers, request_limits=LIMITS)
    except InvalidRequest as exc:
        assert exc.message and len(exc.message) < 2000
        with pytest.raises(ErrorReply):
            decode_reply(encode_error(exc).body, "application/json", None)
        return
    assert 1 <= len(req.inputs) <= LIMITS.max_texts
    assert all(isinstance(t, str) and t.strip() for t in req.inputs)
    assert req.config.model in LIMITS.models
    assert 128 <= req.config.dimensions <= 3072


def test_prefetch_stays_under_the_quorum_cap_and_says_so() -> None:
    from worker.settings import Settings

    base = {"embed_backend": "emulator", "batch_max_size": 100}
    default = Settings(_env_file=None, **base)  # type: ignore[call-arg]
    assert default.effective_prefetch == 2000 and default.prefetch_warnings() == []  # 100 x 65, capped, silently
    narrow = Settings(_env_file=None, max_concurrent_batches=4, **base)  # type: ignore[call-arg]
    assert narrow.effective_prefetch == 900 and narrow.prefetch_warnings() == []
    wide = Settings(_env_file=None, prefetch_count=2500, **base)  # type: ignore[call-arg]
    assert wide.effective_prefetch == 2000 and "above the 2000" in wide.prefetch_warnings()[0]
    classic = Settings(_env_file=None, prefetch_count=2500, queue_type="classic", **base)  # type: ignore[call-arg]
    assert classic.effective_prefetch == 2500 and "below BATCH_MAX_SIZE x" in classic.prefetch_warnings()[0]


# ---------------------------------------------------------------- compressed bodies (content_encoding)
def gzipped(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


@pytest.mark.parametrize("encoding", ["gzip", "GZIP", "x-gzip", " Gzip "])
def test_a_gzip_body_is_decoded_as_the_json_it_holds(encoding: str) -> None:
    body = orjson.dumps({"texts": ["a", "b"], "task_type": "CLUSTERING"})
    req = decode_request(
        gzipped(body), content_type=None, headers=None, request_limits=LIMITS, content_encoding=encoding
    )
    assert req == decode(body)
    deferred = orjson.dumps({"items": [{"key": "k", "text": "t"}]})
    got = decode_deferred(gzipped(deferred), content_type=None, request_limits=LIMITS, content_encoding=encoding)
    assert (got.keys, got.texts) == (["k"], ["t"])


@pytest.mark.parametrize("encoding", [None, "", "identity", "IDENTITY"])
def test_no_encoding_or_identity_takes_the_body_as_it_is(encoding: str | None) -> None:
    body = orjson.dumps({"text": "a"})
    assert decode_request(
        body, content_type=None, headers=None, request_limits=LIMITS, content_encoding=encoding
    ) == decode(body)


@pytest.mark.parametrize(
    ("body", "encoding", "message"),
    [
        (b'{"text": "a"}', "br", "content_encoding 'br' is not supported (gzip or none)"),
        (b'{"text": "a"}', "deflate", "content_encoding 'deflate' is not supported (gzip or none)"),
        (b'{"text": "a"}', "gzip", "body is not valid gzip"),  # not compressed at all
        (gzipped(b'{"text": "a"}')[:-12], "gzip", "body is not valid gzip"),  # cut short
        (gzipped(b'{"text": "a"}') + b"junk", "gzip", "bytes follow its end"),
        (gzipped(b'{"texts": ["a",') + gzipped(b' "b"]}'), "gzip", "one gzip member"),  # cat a.gz b.gz
        (b"", "gzip", "body is not valid gzip"),
    ],
)
def test_bodies_that_cannot_be_decoded_are_refused_by_name(body: bytes, encoding: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_request(body, content_type=None, headers=None, request_limits=LIMITS, content_encoding=encoding)
    assert message in info.value.message
    with pytest.raises(InvalidRequest, match="not supported"):
        decode_deferred(body, content_type=None, request_limits=LIMITS, content_encoding=encoding + "2")


def test_a_gzip_body_just_within_the_limit_is_taken_and_one_byte_more_is_not() -> None:
    limit = LIMITS.max_body_bytes
    fits = orjson.dumps({"text": "a" * 10})
    fits += b" " * (limit - len(fits))  # exactly the limit once decompressed
    assert decode_request(
        gzipped(fits), content_type=None, headers=None, request_limits=LIMITS, content_encoding="gzip"
    )
    with pytest.raises(InvalidRequest) as info:
        decode_request(
            gzipped(fits + b" "), content_type=None, headers=None, request_limits=LIMITS, content_encoding="gzip"
        )
    assert info.value.message == f"body decompresses to more than {limit} bytes; the limit is {limit}"


def test_a_gzip_bomb_is_refused_without_holding_more_than_the_limit() -> None:
    limit = 1024 * 1024
    request_limits = RequestLimits("gemini-embedding-001", frozenset({"gemini-embedding-001"}), limit, 50, None)
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
    zeros = bytes(1024 * 1024)
    bomb = b"".join(compressor.compress(zeros) for _ in range(128)) + compressor.flush()  # 128 MiB of zeros
    assert len(bomb) < limit
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequest, match="decompresses to more than"):
            decode_request(
                bomb, content_type=None, headers=None, request_limits=request_limits, content_encoding="gzip"
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * limit, f"decoding the bomb held {peak} bytes"


# ---------------------------------------------------------------- reply sizes
def unit_vectors(count: int, dims: int, seed: int = 0) -> Any:
    vectors = np.random.default_rng(seed).standard_normal((count, dims)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


components = st.one_of(
    st.floats(-1, 1, width=32),
    st.sampled_from([1e-8, -1e-8, -7.6293945e-6, -1.0000001e-37, 1.1754944e-38, -1.4e-45, -0.0, -1.0, 1.0]),
)


@settings(max_examples=300, deadline=None)
@given(
    rows=st.integers(1, 4).flatmap(
        lambda count: st.integers(1, 40).flatmap(
            lambda dims: st.lists(st.lists(components, min_size=dims, max_size=dims), min_size=count, max_size=count)
        )
    ),
    model=st.sampled_from(["gemini-embedding-001", "gemini-embedding-2", "m" * 100]),
)
def test_the_reply_size_estimate_is_never_below_the_reply(rows: list[list[float]], model: str) -> None:
    vectors = np.asarray(rows, dtype=np.float32)
    count, dims = vectors.shape
    for encoding in ("json", "float32"):
        assert reply_bytes(count, dims, encoding) >= len(encode_vectors(vectors, model, encoding).body)


def test_the_worst_numbers_fill_the_json_estimate() -> None:
    """Every component at the widest float32 orjson writes (16 characters): the bound is met, not passed."""
    vectors = np.full((3, 3072), -7.6293945e-6, dtype=np.float32)
    size = len(encode_vectors(vectors, "gemini-embedding-001").body)
    assert size <= reply_bytes(3, 3072, "json") <= size + 160


def test_the_json_estimate_for_typical_unit_vectors_is_about_a_third_above_the_reply() -> None:
    vectors = unit_vectors(20, 3072)
    actual = len(encode_vectors(vectors, "gemini-embedding-001").body)
    estimate = reply_bytes(20, 3072, "json")
    assert actual < estimate < 1.4 * actual  # measured: 1.34 (components print in 12 characters, the bound in 16)
    binary = len(encode_vectors(vectors, "gemini-embedding-001", "float32").body)
    assert binary < reply_bytes(20, 3072, "float32") <= binary * 1.01


def test_a_thousand_full_vectors_fit_a_16_mib_message_as_float32_only() -> None:
    mib = 1024 * 1024
    assert reply_bytes(1000, 3072, "json") > 16 * mib
    assert 11.5 * mib < reply_bytes(1000, 3072, "float32") < 12 * mib
    with pytest.raises(ValueError, match="reply encoding"):
        reply_bytes(1, 8, "xml")


@settings(max_examples=200, deadline=None)
@given(message=st.text(st.characters(codec=None), max_size=5000) | st.just("\x1f" * 5000) | st.just("\udc80" * 900))
def test_an_error_reply_is_always_under_4_kib(message: str) -> None:
    reply = encode_error(InvalidRequest(message))
    assert len(reply.body) < ERROR_REPLY_MAX_BYTES == 4096
    with pytest.raises(ErrorReply) as err:
        decode_reply(reply.body, reply.content_type, None)
    if len(message) < 500 and message.isprintable() and not any("\ud800" <= c <= "\udfff" for c in message):
        assert err.value.message == message  # short messages are kept as they are
