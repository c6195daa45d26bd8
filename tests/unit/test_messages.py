"""Request decoding and reply encoding."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.errors import ErrorCode, InvalidRequest
from worker.messages import (
    EmbedRequest,
    ErrorReply,
    MalformedReply,
    RequestLimits,
    decode_flush_reply,
    decode_reply,
    decode_request,
    encode_error,
    encode_flush_reply,
    encode_request,
    encode_vectors,
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
    return decode_request(raw, content_type=content_type, headers=headers, limits_=LIMITS)


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
    assert info.value.code == ErrorCode.INVALID_REQUEST and not info.value.replayable


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
    req = decode_request(body, content_type="application/json", headers=None, limits_=LIMITS)
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
        req = decode_request(body, content_type=content_type, headers=headers, limits_=LIMITS)
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
    assert default.effective_prefetch == 900 and default.prefetch_warnings() == []
    wide = Settings(_env_file=None, max_concurrent_batches=12, **base)  # type: ignore[call-arg]
    assert wide.effective_prefetch == 2000 and "above the 2000" in wide.prefetch_warnings()[0]
    classic = Settings(_env_file=None, max_concurrent_batches=12, queue_type="classic", **base)  # type: ignore[call-arg]
    assert classic.effective_prefetch == 2500 and classic.prefetch_warnings() == []
