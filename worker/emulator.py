"""A Gemini-compatible embedding server for running and testing without a key or network.

It speaks the REST endpoints google-genai calls, ``POST /{version}/models/{model}:batchEmbedContents``
(and ``:embedContent``), with deterministic vectors from ``worker.vectors``, and checks what the real
API checks: an API key header, at most 100 texts per call, the token limit per text, a known model,
the output dimension range. Unnormalised vectors below the full dimension, as the real API returns.

Faults and latency are injected from the command line or at run time through ``/_emulator/*``:
    POST /_emulator/config  {"latency_ms": 100, "faults": [{"status": 429, "times": 2}], ...}
    GET  /_emulator/stats   calls, texts and batch sizes seen so far
    POST /_emulator/reset   clear stats and faults
A text containing ``BAD_INPUT_MARKER`` makes the whole batch fail with 400, as the real API rejects a
whole batch for one bad input.

The server is a small asyncio HTTP/1.1 implementation (keep-alive, Content-Length bodies only) so it
is never the bottleneck of a benchmark; vectors are cached per text.
"""

from __future__ import annotations

import asyncio
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

from worker import http, limits
from worker.vectors import Vector, full_vector

log = logging.getLogger(__name__)

BAD_INPUT_MARKER = "\u0000EMULATOR-BAD-INPUT\u0000"
_BATCH_CREATE = re.compile(r"^/(?P<version>v1[a-z0-9]*)/models/(?P<model>[^/:]+):asyncBatchEmbedContent$")
_BATCH_GET = re.compile(r"^/(?P<version>v1[a-z0-9]*)/batches/(?P<id>[^/:]+)$")
_PATH = re.compile(r"^/(?P<version>v1[a-z0-9]*)/models/(?P<model>[^/:]+):(?P<method>batchEmbedContents|embedContent)$")


@dataclass
class Fault:
    status: int
    times: int = 1  # how many calls it applies to; -1 = until reset
    daily: bool = False  # a 429 that reports a per-day quota
    retry_delay_s: float | None = None
    message: str = "injected fault"


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
    jobs: dict[str, BatchJob] = field(default_factory=dict)
    batch_delay_s: float = 0.0  # how long a Batch API job stays pending
    batch_fail_next: int = 0  # that many next jobs end BATCH_STATE_FAILED
    batch_texts: int = 0
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
        }

    def reset(self) -> None:
        self.calls = self.texts = self.rejected = 0
        self.batch_sizes = []
        self.configs = Counter()
        self.call_configs = []
        self.jobs = {}
        self.batch_texts = 0
        self.batch_delay_s = 0.0
        self.batch_fail_next = 0
        self.faults = []
        self.latency_ms = 0.0
        self.fail_rate = 0.0

    def configure(self, body: dict[str, Any]) -> None:
        if "latency_ms" in body:
            self.latency_ms = float(body["latency_ms"])
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
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


@lru_cache(maxsize=100_000)
def _cached_vector(text: str, model: str, task_type: str | None, full_dims: int) -> Vector:
    return full_vector(text, model=model, task_type=task_type, dims=full_dims)


class Emulator:
    def __init__(self, state: EmulatorState | None = None):
        self.state = state or EmulatorState()
        self._server: asyncio.Server | None = None

    # ---------------------------------------------------------------- server lifecycle
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await http.start_server(self._handle, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def serve_forever(self) -> None:
        assert self._server is not None
        async with self._server:
            await self._server.serve_forever()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    # ---------------------------------------------------------------- HTTP
    async def _handle(self, request: http.Request) -> http.Response:
        status, payload = await self._dispatch(request.method, request.path, request.headers, request.body)
        return http.Response(status, payload)

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
            except ApiError as exc:
                return exc.status, _error_body(exc)
            except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError, KeyError) as exc:
                return 400, _error_body(ApiError(400, f"invalid batch request: {exc}"))
        match = _PATH.match(path)
        if method != "POST" or match is None:
            return 404, _error_body(ApiError(404, f"no such endpoint {method} {path}"))
        try:
            self._check_key(headers)
            request = orjson.loads(body)
            if match.group("method") == "embedContent":
                request = {"requests": [dict(request, model=f"models/{match.group('model')}")]}
            requests = request.get("requests")
            if not isinstance(requests, list) or not requests:
                raise ApiError(400, "requests must be a non-empty list")
            if self.state.latency_ms:
                await asyncio.sleep(self.state.latency_ms / 1000)
            fault = self.state.next_fault()
            if fault is not None:
                raise _fault_error(fault)
            payload = self._embed(match.group("model"), requests)
        except ApiError as exc:
            self.state.rejected += 1
            return exc.status, _error_body(exc)
        except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError, KeyError) as exc:
            self.state.rejected += 1
            return 400, _error_body(ApiError(400, f"invalid JSON payload: {exc}"))
        if match.group("method") == "embedContent":
            payload = {"embedding": payload["embeddings"][0]}
        return 200, orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)

    def _check_key(self, headers: dict[str, str]) -> None:
        key = headers.get("x-goog-api-key")
        if not key:
            raise ApiError(403, "Method doesn't allow unregistered callers. Please use an API key.")
        if self.state.api_key is not None and key != self.state.api_key:
            raise ApiError(400, "API key not valid. Please pass a valid API key.")

    def _embed(self, model: str, requests: list[Any]) -> dict[str, Any]:
        if model not in limits.MODEL_DIMENSIONS:
            raise ApiError(404, f"models/{model} is not found for API version v1beta")
        if len(requests) > limits.MAX_TEXTS_PER_CALL:
            raise ApiError(400, f"at most {limits.MAX_TEXTS_PER_CALL} requests can be in one batch")
        full_dims = limits.MODEL_DIMENSIONS[model]
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
    def _create_job(self, model: str, body: dict[str, Any]) -> bytes:
        if model not in limits.MODEL_DIMENSIONS:
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
        if job.output is None and not job.fail and time.monotonic() >= job.ready_at:
            job.output = [self._one_job_item(job.model, request) for request in job.requests]
            self.state.batch_texts += sum(1 for item in job.output if "response" in item)
        return orjson.dumps(self._job_body(job), option=orjson.OPT_SERIALIZE_NUMPY)

    def _one_job_item(self, model: str, request: dict[str, Any]) -> dict[str, Any]:
        """Each request of a job succeeds or fails on its own, as in the real Batch API."""
        try:
            row = self._vector(model, full_dims=limits.MODEL_DIMENSIONS[model], index=0, req=request)
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
    def _vector(model: str, *, full_dims: int, index: int, req: dict[str, Any]) -> Vector:
        """One request's vector, after the checks the real API makes. Each request carries its own config."""
        if req.get("model", f"models/{model}") != f"models/{model}":
            raise ApiError(400, f"requests[{index}].model does not match the URL")
        task_type = req.get("taskType")
        dims = req.get("outputDimensionality")
        if dims is not None and not limits.MIN_OUTPUT_DIMENSIONS <= int(dims) <= full_dims:
            raise ApiError(400, f"outputDimensionality must be between 128 and {full_dims}")
        text = "".join(p["text"] for p in req["content"]["parts"])
        if not text:
            raise ApiError(400, f"requests[{index}]: empty content")
        if BAD_INPUT_MARKER in text:
            raise ApiError(400, f"requests[{index}]: input rejected")
        if limits.estimate_tokens(text) > limits.MAX_TOKENS_PER_TEXT:
            raise ApiError(400, f"requests[{index}]: input exceeds {limits.MAX_TOKENS_PER_TEXT} tokens")
        return _cached_vector(text, model, task_type, full_dims)[: int(dims) if dims else full_dims]

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


def _fault_error(fault: Fault) -> ApiError:
    details: list[dict[str, Any]] = []
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

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def stop(self) -> None:
        if self._loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self.emulator.stop(), self._loop)
            with contextlib.suppress(Exception):
                fut.result(2)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(2)
