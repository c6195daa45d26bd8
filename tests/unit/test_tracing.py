"""``worker.tracing``: nothing of OpenTelemetry imported, and nothing done, while it is off; W3C context carried in
AMQP headers (str or bytes), request spans continuing it, call spans linking their requests."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from aiormq.abc import DeliveredMessage
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from worker import tracing

OFF = """
import sys
from worker import tracing
import worker.client, worker.amqp.rpc, worker.gateway.app, worker.gateway.cli
headers = {}
tracing.inject(headers)
assert headers == {}
with tracing.request_span(None, "q") as a, tracing.server_span({}, "POST", "r") as b:
    assert tracing.capture() is None
    with tracing.call_span((1 for _ in ()), model="m", inputs=1), tracing.client_span("POST", "u") as c:
        c.set_status_code(500)
tracing.note_wait(None, 1.0)
assert not tracing.configure("svc", environ={})
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
assert not loaded, loaded
print("ok")
"""


def test_off_imports_no_opentelemetry_and_every_call_is_a_no_op() -> None:
    result = subprocess.run([sys.executable, "-c", OFF], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_off_context_managers_are_one_shared_object() -> None:
    assert not tracing.enabled()
    assert tracing.request_span(None, "q") is tracing.call_span([], model="m", inputs=0)  # type: ignore[arg-type]


def test_configure_with_an_endpoint_builds_the_otlp_exporter() -> None:
    script = (
        "from worker import tracing\n"
        "assert tracing.configure('svc', environ={'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://127.0.0.1:1'})\n"
        "assert tracing.enabled()\n"
        "tracing.shutdown()\n"
        "assert not tracing.enabled()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def delivery(headers: dict[str, Any]) -> DeliveredMessage:
    props = Basic.Properties(headers=headers, correlation_id="c1", message_id="m1")
    return DeliveredMessage(
        Basic.Deliver(routing_key="embed.requests.bulk"),
        ContentHeader(properties=props),
        b"{}",
        None,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("as_bytes", [False, True])
def test_context_crosses_amqp_headers(exporter: InMemorySpanExporter, as_bytes: bool) -> None:
    headers: dict[str, Any] = {"x-deadline": 1}
    with tracing.server_span({}, "POST", "openai.embeddings") as handle:
        tracing.inject(headers)
        handle.set_status_code(200)
    assert set(headers) == {"x-deadline", "traceparent"}
    if as_bytes:  # as pamqp may hand a header over
        headers = {k: v.encode() if isinstance(v, str) else v for k, v in headers.items()}
    with tracing.request_span(delivery(headers), "embed.requests.bulk"):
        captured = tracing.capture()
        assert captured is not None
        tracing.note_wait(captured, 0.0123)
    server, request = sorted(exporter.get_finished_spans(), key=lambda s: s.kind != SpanKind.SERVER)
    assert request.parent is not None and request.parent.span_id == server.context.span_id
    assert request.context.trace_id == server.context.trace_id
    assert request.attributes is not None
    assert request.attributes["messaging.rabbitmq.destination.routing_key"] == "embed.requests.bulk"
    assert request.attributes["messaging.message.conversation_id"] == "c1"
    assert request.attributes["embed.queue_wait_ms"] == 12.3


def test_call_span_links_each_request_once_and_is_the_first_ones_child(exporter: InMemorySpanExporter) -> None:
    captured = []
    for _ in range(3):
        with tracing.request_span(delivery({}), "embed.requests"):
            captured.append(tracing.capture())
    items = [captured[0], captured[0], None, captured[1], captured[2]]  # two inputs of one request; one untraced
    url = "http://api/v1beta/models/m:batchEmbedContents?key=secret"
    with (
        tracing.call_span(iter(items), model="gemini-embedding-001", inputs=5),
        tracing.client_span("POST", url) as http,
    ):
        http.set_status_code(503)
    spans = {s.kind: s for s in exporter.get_finished_spans()}
    call, client = spans[SpanKind.INTERNAL], spans[SpanKind.CLIENT]
    assert [link.context for link in call.links] == [c.get_span_context() for c in captured if c is not None]
    assert call.attributes is not None and call.attributes["messaging.batch.message_count"] == 3
    assert call.parent is not None and call.parent.span_id == captured[0].get_span_context().span_id  # type: ignore[union-attr]
    assert client.parent is not None and client.parent.span_id == call.context.span_id
    assert client.attributes is not None and "secret" not in str(client.attributes["url.full"])
    assert not client.status.is_ok
