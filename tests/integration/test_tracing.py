"""Traces across the hop: one traced HTTP request through the gateway, a real broker and an in-process worker gives
one trace (gateway span -> request span -> call span -> HTTP client span), and the call span links every request
span of its batch. The SDK's in-memory exporter sees every span, the worker being in this process.

The call and client spans come from hooks in worker/service.py and worker/embedders/gemini.py (see
``worker.tracing``); until those are in, the tests that need them are skipped, saying so.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.integration import test_gateway
from tests.integration.test_gateway import G1, KEY, assert_vectors

pytestmark = pytest.mark.integration

start_gateway = test_gateway.start_gateway  # the same fixture: a gateway in the test's loop
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


async def finished(exporter: InMemorySpanExporter, kind: SpanKind, count: int = 1) -> list[ReadableSpan]:
    """Spans of ``kind``, once ``count`` have ended: a request span ends after its settle, which may come after the
    caller has its answer."""
    deadline = asyncio.get_running_loop().time() + 10
    while len(found := [s for s in exporter.get_finished_spans() if s.kind == kind]) < count:
        assert asyncio.get_running_loop().time() < deadline, f"{len(found)} {kind} spans ended, wanted {count}"
        await asyncio.sleep(0.01)
    return found


def hex_id(value: int, width: int) -> str:
    return format(value, f"0{width}x")


async def traced_request(start_worker: Any, start_gateway: Any) -> None:
    """One request with the caller's ``traceparent``, through the openai SDK; its vector checked."""
    await start_worker()
    gateway = await start_gateway()
    async with openai.AsyncOpenAI(
        api_key=KEY, base_url=f"{gateway.url}/v1", default_headers={"traceparent": TRACEPARENT}
    ) as client:
        response = await client.embeddings.create(model=G1, input="traced text")
    assert_vectors([response.data[0].embedding], ["traced text"])


async def test_one_traced_request_is_one_trace_across_the_gateway_and_the_broker(
    start_worker: Any, start_gateway: Any, exporter: InMemorySpanExporter
) -> None:
    await traced_request(start_worker, start_gateway)
    [server] = await finished(exporter, SpanKind.SERVER)
    [request] = await finished(exporter, SpanKind.CONSUMER)
    assert all(hex_id(s.context.trace_id, 32) == TRACE_ID for s in (server, request)), "not one trace"
    assert server.parent is not None and hex_id(server.parent.span_id, 16) == CALLER_SPAN  # the caller's span
    assert server.attributes is not None and server.attributes["http.response.status_code"] == 200
    assert request.parent is not None and request.parent.span_id == server.context.span_id  # across the broker
    attributes = dict(request.attributes or {})
    assert attributes["messaging.system"] == "rabbitmq"
    assert attributes["messaging.destination.name"] == "embed.requests"
    assert attributes["messaging.rabbitmq.destination.routing_key"] == "embed.requests"


async def test_the_call_span_links_the_request_and_the_http_call_is_its_child(
    start_worker: Any, start_gateway: Any, exporter: InMemorySpanExporter
) -> None:
    await traced_request(start_worker, start_gateway)
    [request] = await finished(exporter, SpanKind.CONSUMER)
    [call] = await finished(exporter, SpanKind.INTERNAL)
    [http] = await finished(exporter, SpanKind.CLIENT)
    assert hex_id(call.context.trace_id, 32) == TRACE_ID  # in the request's trace, as its child
    assert call.parent is not None and call.parent.span_id == request.context.span_id
    assert [link.context.span_id for link in call.links] == [request.context.span_id]
    assert call.attributes is not None and call.attributes["messaging.batch.message_count"] == 1
    assert http.parent is not None and http.parent.span_id == call.context.span_id
    assert http.attributes is not None and http.attributes["http.response.status_code"] == 200
    assert request.attributes is not None and "embed.queue_wait_ms" in request.attributes  # its wait for the batch
    assert any(event.name == "embed.upstream_call_started" for event in request.events)


async def test_a_batch_of_two_traced_requests_links_both(
    start_worker: Any, start_gateway: Any, exporter: InMemorySpanExporter
) -> None:
    """Two requests of two traces in one batch (it flushes at two texts, never by age): one call span, in the
    first request's trace, linking both request spans."""
    await start_worker(batch_max_size=2, batch_max_wait_ms=600_000)
    gateway = await start_gateway()
    parents = [f"00-{i:032x}-{i:016x}-01" for i in (1, 2)]
    async with openai.AsyncOpenAI(api_key=KEY, base_url=f"{gateway.url}/v1") as client:
        answers = await asyncio.gather(
            *(
                client.embeddings.create(model=G1, input=f"batched {i}", extra_headers={"traceparent": parent})
                for i, parent in enumerate(parents)
            )
        )
    for i, answer in enumerate(answers):
        assert_vectors([answer.data[0].embedding], [f"batched {i}"])
    requests = await finished(exporter, SpanKind.CONSUMER, 2)
    [call] = await finished(exporter, SpanKind.INTERNAL)
    assert {r.context.trace_id for r in requests} == {1, 2}
    assert sorted(link.context.span_id for link in call.links) == sorted(r.context.span_id for r in requests)
    assert call.attributes is not None and call.attributes["messaging.batch.message_count"] == 2
    assert call.parent is not None and call.parent.span_id in {r.context.span_id for r in requests}
