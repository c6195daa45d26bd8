"""The gateway's two APIs as pure functions: requests parsed into the worker's wire format, answers and errors in
each API's shapes, and the worker's error codes as HTTP statuses."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import orjson
import pytest

from worker import limits
from worker.client import EmbedClientError
from worker.gateway import gemini_routes, openai_routes
from worker.gateway.calls import Failure, from_client_error, from_error_reply
from worker.gateway.settings import GatewaySettings

MODELS = GatewaySettings(_env_file=None, gateway_allow_anonymous=True).models  # type: ignore[call-arg]


def openai_parse(body: dict[str, Any]) -> openai_routes.Parsed:
    return openai_routes.parse(orjson.dumps(body), models=MODELS, lane="default", timeout=5.0)


def refused(call: Any, *args: Any, **kwargs: Any) -> Failure:
    with pytest.raises(Failure) as caught:
        call(*args, **kwargs)
    return caught.value


def test_openai_request_becomes_a_float32_worker_request() -> None:
    parsed = openai_parse({"model": "gemini-embedding-001", "input": ["a", "bcdef"], "dimensions": 256})
    assert orjson.loads(parsed.job.body) == {
        "texts": ["a", "bcdef"],
        "model": "gemini-embedding-001",
        "reply_encoding": "float32",
        "output_dimensionality": 256,
    }
    assert parsed.encoding == "float"  # the API's default when the field is absent
    assert parsed.job.count == 2 and parsed.job.tokens == limits.estimate_tokens("a") + limits.estimate_tokens("bcdef")
    assert openai_parse({"model": "gemini-embedding-2", "input": "one"}).job.count == 1


@pytest.mark.parametrize(
    ("body", "status", "param", "fragment"),
    [
        ({"model": "gemini-embedding-001", "input": [[1, 2], [3]]}, 400, "input", "token arrays"),
        ({"model": "gemini-embedding-001", "input": [1, 2, 3]}, 400, "input", "check_embedding_ctx_length=False"),
        ({"model": "gemini-embedding-001", "input": []}, 400, "input", "non-empty"),
        ({"model": "gemini-embedding-001", "input": ["a", 3]}, 400, "input", "list of strings"),
        ({"model": "text-embedding-3-small", "input": "a"}, 404, "model", "not served"),
        ({"input": "a"}, 400, "model", "model"),
        ({"model": "gemini-embedding-001", "input": "a", "encoding_format": "int8"}, 400, "encoding_format", "int8"),
        ({"model": "gemini-embedding-001", "input": "a", "dimensions": True}, 400, "dimensions", "integer"),
        ({"model": "gemini-embedding-001", "input": "a", "stream": True}, 400, "stream", "Unrecognized"),
    ],
)
def test_openai_refusals(body: dict[str, Any], status: int, param: str, fragment: str) -> None:
    failure = refused(openai_parse, body)
    assert (failure.status, failure.param) == (status, param)
    assert fragment in failure.message


def test_openai_answers_in_both_encodings() -> None:
    vectors = np.asarray([[0.5, -0.25, 1e-7], [1.0, 0.0, -1.0]], dtype=np.float32)
    for encoding in ("float", "base64"):
        parsed = openai_parse({"model": "gemini-embedding-001", "input": ["ab", "cd"], "encoding_format": encoding})
        answer = orjson.loads(openai_routes.render(vectors, parsed))
        assert answer["object"] == "list" and answer["model"] == "gemini-embedding-001"
        assert answer["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
        for i, item in enumerate(answer["data"]):
            assert item["object"] == "embedding" and item["index"] == i
            got = item["embedding"]
            row = np.frombuffer(base64.b64decode(got), "<f4") if encoding == "base64" else np.asarray(got, np.float32)
            assert np.array_equal(row, vectors[i])  # float32 either way, exactly


def test_openai_error_shape_and_key() -> None:
    body = orjson.loads(openai_routes.error_body(Failure(429, "overloaded", "busy", retry_after=1)))
    assert body == {"error": {"message": "busy", "type": "requests", "param": None, "code": "overloaded"}}
    assert (
        orjson.loads(openai_routes.error_body(Failure(502, "upstream_error", "x")))["error"]["type"] == "server_error"
    )
    assert openai_routes.api_key({"Authorization": "Bearer  k1 "}) == "k1"
    assert openai_routes.api_key({"Authorization": "Basic k1"}) is None
    assert openai_routes.api_key({}) is None
    assert openai_routes.auth_failure(given=True).status == 401


def gemini_parse(body: dict[str, Any], method: str = "batchEmbedContents", model: str = "gemini-embedding-001") -> Any:
    job = gemini_routes.parse(orjson.dumps(body), model=model, method=method, models=MODELS, lane="bulk", timeout=5.0)
    return orjson.loads(job.body), job


def test_gemini_batch_becomes_one_worker_request_of_inputs() -> None:
    text = {"parts": [{"text": "hello"}], "role": "user"}
    wire, job = gemini_parse(
        {
            "requests": [
                {"model": "models/gemini-embedding-001", "content": text, "taskType": "RETRIEVAL_QUERY"},
                {"model": "models/gemini-embedding-001", "content": text, "task_type": "RETRIEVAL_QUERY"},
            ]
        }
    )
    assert wire == {
        "inputs": [{"text": "hello"}, {"text": "hello"}],  # a lone text part is a text on a taskType model
        "model": "gemini-embedding-001",
        "reply_encoding": "float32",
        "task_type": "RETRIEVAL_QUERY",
    }
    assert (job.count, job.lane) == (2, "bulk")


def test_gemini_parts_go_as_they_are_for_gemini_embedding_2() -> None:
    urlsafe = base64.urlsafe_b64encode(b"\xfb\xff\xfe image").decode().rstrip("=")  # as google-genai sends bytes
    content = {"parts": [{"inlineData": {"mimeType": "image/png", "data": urlsafe}}, {"text": "caption"}]}
    wire, _ = gemini_parse({"content": content, "outputDimensionality": 768}, "embedContent", "gemini-embedding-2")
    [item] = wire["inputs"]
    inline = item["parts"][0]["inline_data"]
    assert base64.b64decode(inline["data"], validate=True) == b"\xfb\xff\xfe image"  # standard base64 for the worker
    assert item["parts"][1] == {"text": "caption"} and wire["output_dimensionality"] == 768
    lone, _ = gemini_parse({"content": {"parts": [{"text": "t"}]}}, "embedContent", "gemini-embedding-2")
    assert lone["inputs"] == [{"parts": [{"text": "t"}]}]  # no task instruction added to it
    ref, _ = gemini_parse(
        {"content": {"parts": [{"file_data": {"mime_type": "video/mp4", "file_uri": "gs://b/v.mp4"}}]}},
        "embedContent",
        "gemini-embedding-2",
    )
    assert ref["inputs"][0]["parts"] == [{"file_data": {"mime_type": "video/mp4", "file_uri": "gs://b/v.mp4"}}]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"requests": []}, "non-empty"),
        ({"requests": [{"content": {"parts": []}}]}, "non-empty list of parts"),
        ({"requests": [{"content": {"parts": [{"text": "a"}]}, "title": "T"}]}, "title"),
        ({"requests": [{"model": "models/other", "content": {"parts": [{"text": "a"}]}}]}, "does not match"),
        (
            {
                "requests": [
                    {"content": {"parts": [{"text": "a"}]}, "taskType": "CLUSTERING"},
                    {"content": {"parts": [{"text": "b"}]}},
                ]
            },
            "same taskType",
        ),
        ({"requests": [{"content": {"parts": [{"thought": True}]}}]}, "exactly one of"),
        ({"requests": [{"content": {"parts": [{"text": "a"}]}, "extra": 1}]}, "unknown field"),
    ],
)
def test_gemini_refusals(body: dict[str, Any], fragment: str) -> None:
    failure = refused(gemini_parse, body)
    assert failure.status == 400 and fragment in failure.message


def test_gemini_unknown_model_and_error_shape() -> None:
    failure = refused(gemini_parse, {"requests": []}, model="gemini-pro")
    assert failure.status == 404
    error = orjson.loads(gemini_routes.error_body(failure))["error"]
    assert error == {"code": 404, "message": failure.message, "status": "NOT_FOUND"}
    key = orjson.loads(gemini_routes.error_body(gemini_routes.auth_failure(given=True)))["error"]
    assert key["code"] == 400 and key["details"][0]["reason"] == "API_KEY_INVALID"  # as the API answers a wrong key
    assert gemini_routes.auth_failure(given=False).status == 403
    busy = orjson.loads(gemini_routes.error_body(Failure(429, "overloaded", "busy", retry_after=1)))["error"]
    assert busy["status"] == "RESOURCE_EXHAUSTED" and busy["details"][0]["retryDelay"] == "1s"
    assert gemini_routes.api_key({}, {"key": "k"}) == "k"
    assert gemini_routes.api_key({"x-goog-api-key": "h"}, {"key": "k"}) == "h"


def test_gemini_answers() -> None:
    vectors = np.asarray([[0.5, -0.5], [1.0, 0.0]], dtype=np.float32)
    assert orjson.loads(gemini_routes.render(vectors, "batchEmbedContents")) == {
        "embeddings": [{"values": [0.5, -0.5]}, {"values": [1.0, 0.0]}]
    }
    assert orjson.loads(gemini_routes.render(vectors[:1], "embedContent")) == {"embedding": {"values": [0.5, -0.5]}}


@pytest.mark.parametrize(
    ("code", "message", "status", "param"),
    [
        ("invalid_request", "text 3 is empty", 400, "input"),
        ("invalid_request", "output_dimensionality must be between 128 and 3072", 400, "dimensions"),
        ("invalid_request", "unknown model 'x'; this worker serves [...]", 404, "model"),
        ("invalid_request", "body is 5000000 bytes; the limit is 4194304", 413, None),
        ("rate_limited", "the API budget has no room", 429, None),
        ("upstream_error", "Gemini API 503", 502, None),
        ("internal", "internal error: KeyError", 502, None),
        ("deadline_exceeded", "the request's x-deadline passed", 504, None),
        ("store_unavailable", "redis", 503, None),
    ],
)
def test_worker_error_codes_as_http_statuses(code: str, message: str, status: int, param: str | None) -> None:
    failure = from_error_reply(code, message)
    assert (failure.status, failure.param) == (status, param)
    assert (failure.retry_after is not None) == (status in (429, 503))


@pytest.mark.parametrize(
    ("code", "status"), [("timeout", 504), ("connection_lost", 503), ("unroutable", 503), ("malformed_reply", 502)]
)
def test_client_errors_as_http_statuses(code: str, status: int) -> None:
    assert from_client_error(EmbedClientError(code, "m", True)).status == status
