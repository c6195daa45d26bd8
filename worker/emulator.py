"""A Gemini-compatible embedding server for running and testing without a key or network.

It speaks the REST endpoints google-genai calls, ``POST /{version}/models/{model}:batchEmbedContents``
(and ``:embedContent``), with deterministic vectors from ``worker.vectors``, and checks what the real
API checks: an API key header, the request payload size, at most 100 requests per call, a known model, the
token limit per input, the output dimension range, and for gemini-embedding-2 the media it takes (types, how
many images per input). Each request's content yields ONE vector however many parts it has, derived from every
part's bytes (``vectors.seed_of``): a client that merges several inputs into one content, as google-genai does
with a list of strings for a multimodal model, gets one vector back, as from the real API. Parts may be written
in the REST API's camelCase or in the snake_case the SDK sends. gemini-embedding-2 ignores ``taskType``, as the
API is reported to (its task goes into the prompt). Unnormalised vectors below the full dimension, as the real
API returns.

Faults and latency are injected from the command line or at run time through ``/_emulator/*``:
    POST /_emulator/config  {"latency_ms": 100, "faults": [{"status": 429, "times": 2}], ...}
``capacity`` plays an upstream that saturates: past that many calls at once, each call's latency grows in
proportion (``latency_ms x in flight / capacity``, processor sharing), so more concurrency buys no more
throughput, only queueing; the adaptive concurrency limit must find that knee. ``indent`` writes responses as
the real API does, indented with two spaces (compact by default, as the benchmarks' history was measured).
    GET  /_emulator/stats   calls, texts and batch sizes seen so far
    POST /_emulator/reset   clear stats and faults
A text containing ``BAD_INPUT_MARKER`` makes the whole batch fail with 400, as the real API rejects a
whole batch for one bad input.

The server is aiohttp's, with one catch-all route into ``Emulator._dispatch``, no access log, and
vectors cached per text, so it is not the bottleneck of a benchmark. Request bodies are limited to
``MAX_BODY`` (a larger one is answered with a Gemini-style error and never read whole), and a body must
arrive within ``BODY_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
from aiohttp import web

from worker import limits
from worker.vectors import FloatArray, full_vector, seed_of

log = logging.getLogger(__name__)

BAD_INPUT_MARKER = "\u0000EMULATOR-BAD-INPUT\u0000"
_BATCH_CREATE = re.compile(r"^/(?P<version>v1[a-z0-9]*)/models/(?P<model>[^/:]+):asyncBatchEmbedContent$")
_BATCH_GET = re.compile(r"^/(?P<version>v1[a-z0-9]*)/batches/(?P<id>[^/:]+)$")
# The transport limit on request bodies. The real API refuses payloads over a few MiB (4,194,304 bytes has
# been reported) with a 400 INVALID_ARGUMENT; this limit sits well above that, at 32 MiB, so the emulator
# can read an oversize request and answer it as the API does, while a client still cannot make it buffer
# an unbounded body. (100 texts of 2,048 tokens are about 1 MiB of JSON.)
MAX_BODY = 32 * 1024 * 1024
BODY_TIMEOUT_S = 60.0  # to receive a whole request body once its head has arrived
# Longer than any client's keep-alive expiry (httpx: 5 s), so it is the client that closes idle connections
# and never races the server closing one it is about to reuse.
KEEPALIVE_TIMEOUT_S = 75.0
_PATH = re.compile(r"^/(?P<version>v1[a-z0-9]*)/models/(?P<model>[^/:]+):(?P<method>batchEmbedContents|embedContent)$")


@dataclass
class Fault:
    status: int
    times: int = 1  # how many calls it applies to; -1 = until reset
    daily: bool = False  # a 429 that reports a per-day quota
    retry_delay_s: float | None = None
    message: str = "injected fault"
    reason: str | None = None  # a google.rpc.ErrorInfo reason, e.g. API_KEY_EXPIRED


@dataclass
class BatchJob:
    """A Batch API job: embeddings computed when the job is first read after ``ready_at``."""

    name: str
    model: str
    requests: list[dict[str, Any]]
    ready_at: float
    fail: bool = False
    output: list[dict[str, Any]] | None = None


@dataclass
class EmulatorState:
    latency_ms: float = 0.0
    capacity: int = 0  # calls served at full speed at once; 0 = any number
    indent: bool = False  # responses indented like the real API's
    in_flight: int = 0
    max_in_flight: int = 0
    fail_rate: float = 0.0
    fail_status: int = 503
    api_key: str | None = None
    faults: list[Fault] = field(default_factory=list)
    calls: int = 0
    texts: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    configs: Counter[str] = field(default_factory=Counter)  # texts seen per model/task_type/dims
    call_configs: list[list[str]] = field(default_factory=list)  # distinct configs in each call
    rejected: int = 0
    max_request_bytes: int = limits.MAX_REQUEST_BYTES  # the API's payload limit, as played here
    call_bytes: list[int] = field(default_factory=list)  # request body size of each successful call
    call_times: list[float] = field(default_factory=list)  # time.time() of each successful call
    jobs: dict[str, BatchJob] = field(default_factory=dict)
    batch_delay_s: float = 0.0  # how long a Batch API job stays pending
    batch_fail_next: int = 0  # that many next jobs end BATCH_STATE_FAILED
    batch_texts: int = 0
    batch_reads: int = 0  # reads of a known job (batches.get)
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def stats(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "texts": self.texts,
            "batch_sizes": self.batch_sizes,
            "configs": dict(self.configs),
            "call_configs": self.call_configs,
            "rejected": self.rejected,
            "batch_jobs": len(self.jobs),
            "batch_texts": self.batch_texts,
            "batch_reads": self.batch_reads,
            "call_bytes": self.call_bytes,
            "call_times": self.call_times,
            "max_in_flight": self.max_in_flight,
        }

    def reset(self) -> None:
        self.calls = self.texts = self.rejected = 0
        self.batch_sizes = []
        self.call_bytes = []
        self.call_times = []
        self.max_request_bytes = limits.MAX_REQUEST_BYTES
        self.configs = Counter()
        self.call_configs = []
        self.jobs = {}
        self.batch_texts = self.batch_reads = 0
        self.batch_delay_s = 0.0
        self.batch_fail_next = 0
        self.faults = []
        self.latency_ms = 0.0
        self.capacity = 0
        self.indent = False
        self.max_in_flight = self.in_flight
        self.fail_rate = 0.0
        self.fail_status = 503
        self.api_key = None
        self.rng = random.Random(0)

    def configure(self, body: dict[str, Any]) -> None:
        if "latency_ms" in body:
            self.latency_ms = float(body["latency_ms"])
        if "capacity" in body:
            self.capacity = int(body["capacity"])
        if "indent" in body:
            self.indent = bool(body["indent"])
        if "fail_rate" in body:
            self.fail_rate = float(body["fail_rate"])
        if "fail_status" in body:
            self.fail_status = int(body["fail_status"])
        if "faults" in body:
            self.faults = [Fault(**f) for f in body["faults"]]
        if "batch_delay_s" in body:
            self.batch_delay_s = float(body["batch_delay_s"])
        if "batch_fail_next" in body:
            self.batch_fail_next = int(body["batch_fail_next"])
        if "api_key" in body:  # None accepts any key; a string is the only key accepted (revoke by changing it)
            self.api_key = body["api_key"]
        if "max_request_bytes" in body:
            self.max_request_bytes = int(body["max_request_bytes"])

    def next_fault(self) -> Fault | None:
        if self.faults:
            fault = self.faults[0]
            if fault.times > 0:
                fault.times -= 1
                if fault.times == 0:
                    self.faults.pop(0)
            return fault
        if self.fail_rate and self.rng.random() < self.fail_rate:
            return Fault(status=self.fail_status, message="random injected fault")
        return None


class ApiError(Exception):
    def __init__(self, status: int, message: str, details: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details or []


_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


@lru_cache(maxsize=100_000)
def _cached_vector(text: str, model: str, task_type: str | None, full_dims: int) -> FloatArray:
    return full_vector(text, model=model, task_type=task_type, dims=full_dims)


class Emulator:
    def __init__(self, state: EmulatorState | None = None):
        self.state = state or EmulatorState()
        self._runner: web.AppRunner | None = None
        self._stopped = asyncio.Event()

    # ---------------------------------------------------------------- server lifecycle
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{path:.*}", self._handle)
        # No cap on connections: like the API's front end, the emulator serves whatever the benchmark opens.
        self._runner = web.AppRunner(
            app, access_log=None, keepalive_timeout=KEEPALIVE_TIMEOUT_S, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=512)
        await site.start()
        self._stopped.clear()
        return int(self._runner.addresses[0][1])

    async def serve_forever(self) -> None:
        assert self._runner is not None
        try:
            await self._stopped.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner.cleanup(), 2.0)
        self._stopped.set()

    # ---------------------------------------------------------------- HTTP
    async def _handle(self, request: web.Request) -> web.Response:
        size = request.content_length
        if size is not None and size > MAX_BODY:  # refused before reading it
            return _too_large()
        try:
            async with asyncio.timeout(BODY_TIMEOUT_S):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:  # a chunked body that outgrew the limit
            return _too_large()
        except TimeoutError:
            response = _response(408, _error_body(ApiError(408, "timed out reading the request body")))
            response.force_close()
            return response
        headers = {name.lower(): value for name, value in request.headers.items()}
        status, payload = await self._dispatch(request.method, request.rel_url.raw_path, headers, body)
        return _response(status, payload)

    async def _dispatch(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        if path.startswith("/_emulator/"):
            return self._control(method, path, body)
        if (batch := _BATCH_CREATE.match(path) or _BATCH_GET.match(path)) is not None:
            try:
                self._check_key(headers)
                if method == "POST" and "model" in batch.groupdict():
                    return 200, self._create_job(batch.group("model"), orjson.loads(body))
                if method == "GET" and "id" in batch.groupdict():
                    return 200, self._read_job(batch.group("id"))
                if method == "DELETE" and "id" in batch.groupdict():
                    return 200, self._delete_job(batch.group("id"))
            except ApiError as exc:
                return exc.status, _error_body(exc)
            except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError, KeyError) as exc:
                return 400, _error_body(ApiError(400, f"invalid batch request: {exc}"))
        match = _PATH.match(path)
        if method != "POST" or match is None:
            return 404, _error_body(ApiError(404, f"no such endpoint {method} {path}"))
        try:
            self._check_key(headers)
            if len(body) > self.state.max_request_bytes:
                raise ApiError(400, f"Request payload size exceeds the limit: {self.state.max_request_bytes} bytes.")
            request = orjson.loads(body)
            if match.group("method") == "embedContent":
                request = {"requests": [dict(request, model=f"models/{match.group('model')}")]}
            requests = request.get("requests")
            if not isinstance(requests, list) or not requests:
                raise ApiError(400, "requests must be a non-empty list")
            if self.state.latency_ms:
                await self._wait()
            fault = self.state.next_fault()
            if fault is not None:
                raise _fault_error(fault)
            payload = self._embed(match.group("model"), requests)
            self.state.call_bytes.append(len(body))
            self.state.call_times.append(time.time())
        except ApiError as exc:
            self.state.rejected += 1
            return exc.status, _error_body(exc)
        except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError, KeyError) as exc:
            self.state.rejected += 1
            return 400, _error_body(ApiError(400, f"invalid JSON payload: {exc}"))
        if match.group("method") == "embedContent":
            payload = {"embedding": payload["embeddings"][0]}
        indent = orjson.OPT_INDENT_2 if self.state.indent else 0
        return 200, orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY | indent)

    async def _wait(self) -> None:
        """The call's latency: ``latency_ms``, stretched in proportion to the calls in flight past ``capacity``
        (re-read as they come and go, so a call shares the upstream with every call that overlaps it)."""
        state = self.state
        latency = state.latency_ms / 1000  # this call's, however the setting changes meanwhile
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            done, last = 0.0, time.monotonic()
            while done < 1.0:  # the fraction of its work done
                share = 1.0 if not state.capacity else min(1.0, state.capacity / state.in_flight)
                left = (1.0 - done) / share * latency
                await asyncio.sleep(min(left, 0.005) if state.capacity else left)
                now = time.monotonic()
                done += (now - last) * share / latency
                last = now
        finally:
            state.in_flight -= 1

    def _check_key(self, headers: dict[str, str]) -> None:
        key = headers.get("x-goog-api-key")
        if not key:
            raise ApiError(
                403,
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API.",
            )
        if self.state.api_key is not None and key != self.state.api_key:
            # What the real API answers for a wrong or revoked key: 400, not 401/403 (see errors.CredentialError).
            raise ApiError(400, INVALID_KEY_MESSAGE, _error_info("API_KEY_INVALID", INVALID_KEY_MESSAGE))

    def _embed(self, model: str, requests: list[Any]) -> dict[str, Any]:
        if model not in limits.MODELS:
            raise ApiError(404, f"models/{model} is not found for API version v1beta")
        if len(requests) > limits.MAX_TEXTS_PER_CALL:
            most = limits.MAX_TEXTS_PER_CALL
            raise ApiError(400, f"* BatchEmbedContentsRequest.requests: at most {most} requests can be in one batch")
        full_dims = limits.full_dimensions(model)
        rows = []
        seen: set[str] = set()
        for i, req in enumerate(requests):
            rows.append(self._vector(model, full_dims=full_dims, index=i, req=req))
            config = f"{model}/{req.get('taskType')}/{req.get('outputDimensionality')}"
            seen.add(config)
            self.state.configs[config] += 1
        self.state.calls += 1
        self.state.texts += len(rows)
        self.state.batch_sizes.append(len(rows))
        self.state.call_configs.append(sorted(seen))
        return {"embeddings": [{"values": row} for row in rows]}

    # ---------------------------------------------------------------- Batch API (asynchronous jobs)
    # POST {model}:asyncBatchEmbedContent creates a job, GET batches/{id} reads it, DELETE batches/{id} forgets it
    # (the API's batches.delete: the job reads as 404 NOT_FOUND from then on).
    def _create_job(self, model: str, body: dict[str, Any]) -> bytes:
        if model not in limits.MODELS:
            raise ApiError(404, f"models/{model} is not found for API version v1beta")
        items = body["batch"]["inputConfig"]["requests"]["requests"]
        if not isinstance(items, list) or not items:
            raise ApiError(400, "batch.inputConfig.requests.requests must be a non-empty list")
        job_id = f"emu{len(self.state.jobs) + 1}{self.state.rng.getrandbits(32):08x}"
        fail = self.state.batch_fail_next > 0
        self.state.batch_fail_next -= int(fail)
        job = BatchJob(
            f"batches/{job_id}",
            model,
            [dict(item["request"]) for item in items],
            time.monotonic() + self.state.batch_delay_s,
            fail,
        )
        self.state.jobs[job_id] = job
        return orjson.dumps(self._job_body(job))

    def _read_job(self, job_id: str) -> bytes:
        job = self.state.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"batches/{job_id} not found")
        self.state.batch_reads += 1
        if job.output is None and not job.fail and time.monotonic() >= job.ready_at:
            job.output = [self._one_job_item(job.model, request) for request in job.requests]
            self.state.batch_texts += sum(1 for item in job.output if "response" in item)
        return orjson.dumps(self._job_body(job), option=orjson.OPT_SERIALIZE_NUMPY)

    def _delete_job(self, job_id: str) -> bytes:
        """``batches.delete``: the API forgets the job (it reads as 404 from then on) and answers an empty object."""
        if self.state.jobs.pop(job_id, None) is None:
            raise ApiError(404, f"batches/{job_id} not found")
        return b"{}"

    def _one_job_item(self, model: str, request: dict[str, Any]) -> dict[str, Any]:
        """Each request of a job succeeds or fails on its own, as in the real Batch API."""
        try:
            row = self._vector(model, full_dims=limits.full_dimensions(model), index=0, req=request)
        except (ApiError, KeyError, TypeError) as exc:
            message = exc.message if isinstance(exc, ApiError) else "malformed request"
            return {"error": {"code": 3, "message": message}}
        return {"response": {"embedding": {"values": row}}}

    @staticmethod
    def _job_body(job: BatchJob) -> dict[str, Any]:
        done = job.fail or job.output is not None
        state = "BATCH_STATE_FAILED" if job.fail else "BATCH_STATE_SUCCEEDED" if done else "BATCH_STATE_PENDING"
        metadata: dict[str, Any] = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1main.EmbedContentBatch",
            "name": job.name,
            "model": f"models/{job.model}",
            "state": state,
        }
        if job.output is not None:
            metadata["output"] = {"inlinedResponses": {"inlinedResponses": job.output}}
        return {"name": job.name, "metadata": metadata, "done": done}

    @staticmethod
    def _vector(model: str, *, full_dims: int, index: int, req: dict[str, Any]) -> FloatArray:
        """One request's vector, after the checks the real API makes. Each request carries its own config, and its
        content yields one vector whatever its parts."""
        if req.get("model", f"models/{model}") != f"models/{model}":
            raise ApiError(400, f"requests[{index}].model does not match the URL")
        facts = limits.model(model)
        task_type = None if facts.task_in_prompt else req.get("taskType")  # the API ignores it for these
        dims = req.get("outputDimensionality")
        if dims is not None and not limits.MIN_OUTPUT_DIMENSIONS <= int(dims) <= full_dims:
            raise ApiError(400, f"outputDimensionality must be between 128 and {full_dims}")
        parts = _parts(req["content"]["parts"], index, model, facts)
        if not parts:
            raise ApiError(400, f"requests[{index}]: empty content")
        text = "".join(payload.decode("utf-8", "surrogatepass") for kind, _, payload in parts if kind == "text")
        if BAD_INPUT_MARKER in text:
            raise ApiError(400, f"requests[{index}]: input rejected")
        if limits.estimate_tokens(text) > facts.max_tokens:
            raise ApiError(400, f"requests[{index}]: input exceeds {facts.max_tokens} tokens")
        return _cached_vector(seed_of(parts), model, task_type, full_dims)[: int(dims) if dims else full_dims]

    def _control(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        if path == "/_emulator/stats":
            return 200, orjson.dumps(self.state.stats())
        if path == "/_emulator/reset" and method == "POST":
            self.state.reset()
            return 200, b"{}"
        if path == "/_emulator/stats/reset" and method == "POST":
            latency, fail_rate = self.state.latency_ms, self.state.fail_rate
            self.state.reset()  # counters only: keep the configured latency and fault rate
            self.state.latency_ms, self.state.fail_rate = latency, fail_rate
            return 200, b"{}"
        if path == "/_emulator/config" and method == "POST":
            self.state.configure(orjson.loads(body or b"{}"))
            return 200, b"{}"
        return 404, _error_body(ApiError(404, "unknown emulator control endpoint"))


INVALID_KEY_MESSAGE = "API key not valid. Please pass a valid API key."


def _error_info(reason: str, message: str) -> list[dict[str, Any]]:
    """The ``details`` Google APIs attach to a key error: ErrorInfo (machine-readable) and LocalizedMessage."""
    return [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": reason,
            "domain": "googleapis.com",
            "metadata": {"service": "generativelanguage.googleapis.com"},
        },
        {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": message},
    ]


def _parts(raw: list[dict[str, Any]], index: int, model: str, facts: limits.Model) -> list[tuple[str, str, bytes]]:
    """A content's parts as (kind, mime type, payload), checked against the model's facts."""
    parts: list[tuple[str, str, bytes]] = []
    images = 0
    for part in raw:
        if "text" in part:
            if part["text"]:
                parts.append(("text", "", str(part["text"]).encode("utf-8", "surrogatepass")))
            continue
        inline = part.get("inlineData", part.get("inline_data"))
        ref = part.get("fileData", part.get("file_data"))
        blob = inline if inline is not None else ref
        if not isinstance(blob, dict):
            raise ApiError(400, f"requests[{index}]: a part must have text, inlineData or fileData")
        mime = str(blob.get("mimeType", blob.get("mime_type", "")))
        if mime not in facts.media:
            raise ApiError(400, f"Unsupported MIME type: {mime}")
        if inline is not None:
            parts.append(("inline", mime, _bytes_field(str(inline.get("data", "")))))
        else:
            parts.append(("file", mime, str(ref.get("fileUri", ref.get("file_uri", ""))).encode()))  # type: ignore[union-attr]
        images += mime in limits.IMAGE_TYPES
    if images > facts.max_images:
        raise ApiError(400, f"requests[{index}]: at most {facts.max_images} images per content for models/{model}")
    return parts


def _bytes_field(data: str) -> bytes:
    """A protobuf ``bytes`` field in JSON: standard or URL-safe base64, with or without padding (the protobuf JSON
    mapping accepts all four; google-genai sends URL-safe)."""
    data = data.replace("-", "+").replace("_", "/")
    return base64.b64decode(data + "=" * (-len(data) % 4), validate=True)


def _fault_error(fault: Fault) -> ApiError:
    details: list[dict[str, Any]] = []
    if fault.reason is not None:
        details += _error_info(fault.reason, fault.message)
    if fault.status == 429:
        quota = (
            "EmbedContentRequestsPerDayPerProjectPerModel"
            if fault.daily
            else "EmbedContentRequestsPerMinutePerProjectPerModel"
        )
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [
                    {"quotaMetric": "generativelanguage.googleapis.com/embed_content_requests", "quotaId": quota}
                ],
            }
        )
    if fault.retry_delay_s is not None:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{fault.retry_delay_s}s"})
    return ApiError(fault.status, fault.message, details)


def _error_body(exc: ApiError) -> bytes:
    error: dict[str, Any] = {
        "code": exc.status,
        "message": exc.message,
        "status": _STATUS_NAMES.get(exc.status, "UNKNOWN"),
    }
    if exc.details:
        error["details"] = exc.details
    return orjson.dumps({"error": error})


def _response(status: int, payload: bytes) -> web.Response:
    return web.Response(status=status, body=payload, content_type="application/json", charset="UTF-8")


def _too_large() -> web.Response:
    """What Google APIs answer for an oversize payload: 400 INVALID_ARGUMENT with this message."""
    response = _response(400, _error_body(ApiError(400, f"Request payload size exceeds the limit: {MAX_BODY} bytes.")))
    response.force_close()  # the rest of the body is drained (for up to aiohttp's lingering time), then closed
    return response


class EmulatorThread:
    """The emulator on its own event loop in a daemon thread, for in-process use."""

    def __init__(self, state: EmulatorState | None = None, host: str = "127.0.0.1", port: int = 0):
        self.emulator = Emulator(state)
        self._host, self._port = host, port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gemini-emulator", daemon=True)
        self.port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self.port = self._loop.run_until_complete(self.emulator.start(self._host, self._port))
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> str:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("emulator did not start")
        return self.base_url

    async def _stop(self) -> None:
        await self.emulator.stop()
        # What aiohttp leaves behind: a connection lost while its unread body was being drained (lingering
        # close) keeps its task until the drain times out. Cancel such leftovers before the loop stops.
        leftovers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in leftovers:
            task.cancel()
        await asyncio.gather(*leftovers, return_exceptions=True)

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def stop(self) -> None:
        if self._loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._stop(), self._loop)
            with contextlib.suppress(Exception):
                fut.result(2)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(2)
