"""OpenTelemetry traces across the hop (caller -> gateway -> broker -> worker -> Gemini), optional and free when off.

Off unless ``configure`` finds ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) set, or a test hands
``install`` a provider of its own. While off, nothing of OpenTelemetry is imported and every function here returns
at once: ``request_span`` and friends give a shared ``nullcontext``, ``capture`` gives None, ``inject`` does nothing.
(``redis`` imports parts of the SDK on its own when the SDK is installed: that is redis's doing, not ours.)

Context travels as the W3C Trace Context says, for AMQP as for HTTP: ``traceparent`` and ``tracestate`` in the
message headers (``inject`` on publish, ``request_span`` extracts on delivery).

The spans:
- ``server_span``: the gateway's HTTP request (kind SERVER), continuing the caller's ``traceparent``.
- ``request_span``: one delivery of an RPC lane, from delivery to settle (kind CONSUMER), with
  ``messaging.system=rabbitmq``, ``messaging.destination.name`` (the queue),
  ``messaging.rabbitmq.destination.routing_key``; ``note_wait`` adds the time it waited for its batch
  (``embed.queue_wait_ms`` and an event).
- ``call_span``: one upstream call for a batch (retries included). A batch has many parents, one per request, and
  OpenTelemetry's answer to that is links: it links every request span of the batch (``capture`` takes one when
  the request's item is made) and has ``messaging.batch.message_count``. Its parent is the batch's first request,
  so the call also shows inside that request's trace.
- ``client_span``: each HTTP call to Gemini (kind CLIENT), a child of the call span.

Why not ``opentelemetry-instrumentation-aio-pika``: it declares ``aio_pika<10`` (this project runs aio-pika 10),
it wraps aio-pika's own ``Queue.consume`` callbacks, which the worker does not use (it consumes on aiormq's channel,
``amqp/rpc.py``), and it knows nothing of batches: it would give one span per message and none for the upstream
call that serves a hundred of them. The few lines of propagation it offers are here instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    from worker.amqp.seams import Delivered

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
TRACER_NAME = "embed-worker"
# A request span captured for a later link (None while tracing is off).
Captured: TypeAlias = "Span | None"


class SpanHandle:
    """What a span context manager yields: a place to put the HTTP status once it is known."""

    __slots__ = ("_server", "_span")

    def __init__(self, span: Span | None = None, *, server: bool = False):
        self._span = span
        self._server = server

    def set_status_code(self, status: int) -> None:
        if self._span is None:
            return
        from opentelemetry.trace import Status, StatusCode

        self._span.set_attribute("http.response.status_code", status)
        # Semantic conventions: a server's 4xx is the caller's fault, not an error of this span; a client's is.
        if status >= 500 or (status >= 400 and not self._server):
            self._span.set_status(Status(StatusCode.ERROR))


_NO_SPAN = SpanHandle()
_NOOP: AbstractContextManager[SpanHandle] = contextlib.nullcontext(_NO_SPAN)  # reusable, shared by every call


class _State:
    """Whether tracing is on: one mutable place, read by every function below."""

    otel: _Otel | None = None


_state = _State()


def enabled() -> bool:
    return _state.otel is not None


# ---------------------------------------------------------------------- switching on and off
def configure(service_name: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Turn tracing on when an OTLP endpoint is configured (the exporter reads the rest of ``OTEL_*`` itself);
    returns whether it is on. Raises ``ConfigurationError`` when an endpoint is set and the ``[otel]`` extra is not
    installed. Called once by each composition root (the gateway's, the worker's)."""
    if _state.otel is not None or not any(environ.get(name) for name in ENDPOINT_VARIABLES):
        return _state.otel is not None
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        from worker.errors import ConfigurationError

        raise ConfigurationError(
            f"OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed ({exc.name}): "
            "pip install 'embed-worker[otel]'"
        ) from None
    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)  # also for any other instrumentation in the process
    install(provider.get_tracer(TRACER_NAME), owned=provider)
    return True


def install(tracer: Tracer, *, owned: Any = None) -> None:
    """Trace with ``tracer`` from now on (tests: one from an SDK provider with an in-memory exporter). ``owned``: a
    provider ``shutdown`` flushes and closes."""
    _state.otel = _Otel(tracer, owned)


def shutdown() -> None:
    """At process exit: flush the spans of the provider ``configure`` made, and turn tracing off. A tracer a test
    installed stays (``uninstall`` removes it)."""
    if _state.otel is not None and _state.otel.owned is not None:
        _state.otel.owned.shutdown()
        uninstall()


def uninstall() -> None:
    _state.otel = None


# ---------------------------------------------------------------------- the seam: each a no-op while off
def inject(headers: MutableMapping[str, Any]) -> None:
    """Write the current span's ``traceparent`` (and ``tracestate``) into outgoing message headers."""
    if _state.otel is not None:
        _state.otel.propagator.inject(headers)


def server_span(headers: Mapping[str, str], method: str, route: str) -> AbstractContextManager[SpanHandle]:
    """The gateway's span for one HTTP request, continuing the caller's ``traceparent``."""
    if _state.otel is None:
        return _NOOP
    return _state.otel.server_span(headers, method, route)


def request_span(message: Delivered, queue: str) -> AbstractContextManager[SpanHandle]:
    """One delivery of an RPC lane, from delivery to settle: wrap the handler call and the settle in it."""
    if _state.otel is None:
        return _NOOP
    return _state.otel.request_span(message, queue)


def capture() -> Captured:
    """The current span (a request's), to link from its batch's call span and to note its wait on."""
    if _state.otel is None:
        return None
    span = _state.otel.trace.get_current_span()
    return span if span.get_span_context().is_valid else None


def note_wait(captured: Captured, seconds: float) -> None:
    """The time a request waited, from its delivery to the start of its upstream call (batching, a slot, the
    budget): what ``embed_queue_wait_seconds`` measures, on the request's own span."""
    if captured is not None:
        captured.set_attribute("embed.queue_wait_ms", round(seconds * 1000, 3))
        captured.add_event("embed.upstream_call_started", {"embed.queue_wait_ms": round(seconds * 1000, 3)})


def call_span(captured: Iterable[Captured], *, model: str, inputs: int) -> AbstractContextManager[SpanHandle]:
    """One upstream call for a batch, linked to each request span in it (``captured``: one per input, repeats and
    Nones allowed; a generator costs nothing while tracing is off, it is never iterated); current while the call
    runs, so the HTTP calls under it are its children."""
    if _state.otel is None:
        return _NOOP
    return _state.otel.call_span(captured, model, inputs)


def client_span(method: str, url: str) -> AbstractContextManager[SpanHandle]:
    """One HTTP call to the embedding API, a child of the current (call) span."""
    if _state.otel is None:
        return _NOOP
    return _state.otel.client_span(method, url)


# ---------------------------------------------------------------------- the OpenTelemetry side, built only when on
def _header_value(carrier: Mapping[str, Any], key: str) -> list[str] | None:
    """A header of an AMQP table (str, or bytes as pamqp may hand them over) as the propagator's getter wants it."""
    value = carrier.get(key)
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("latin-1")
    return [str(value)]


class _Otel:
    """The tracer and the few API pieces the seam uses, imported once when tracing is switched on."""

    def __init__(self, tracer: Tracer, owned: Any):
        from opentelemetry import trace
        from opentelemetry.propagators.textmap import DefaultGetter, Getter
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        class AmqpGetter(Getter[Mapping[str, Any]]):
            def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
                return _header_value(carrier, key)

            def keys(self, carrier: Mapping[str, Any]) -> list[str]:
                return list(carrier)

        self.tracer = tracer
        self.owned = owned
        self.trace = trace
        self.propagator = TraceContextTextMapPropagator()  # W3C only: no baggage rides along unasked
        self.amqp_getter = AmqpGetter()
        self.http_getter = DefaultGetter()

    @contextlib.contextmanager
    def server_span(self, headers: Mapping[str, str], method: str, route: str) -> Iterator[SpanHandle]:
        parent = self.propagator.extract(headers, getter=self.http_getter)
        attributes = {"http.request.method": method, "http.route": route}
        with self.tracer.start_as_current_span(
            f"{method} {route}", context=parent, kind=self.trace.SpanKind.SERVER, attributes=attributes
        ) as span:
            yield SpanHandle(span, server=True)

    @contextlib.contextmanager
    def request_span(self, message: Delivered, queue: str) -> Iterator[SpanHandle]:
        props = message.header.properties
        parent = self.propagator.extract(props.headers or {}, getter=self.amqp_getter)
        attributes: dict[str, str | int] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.destination.name": queue,
            "messaging.rabbitmq.destination.routing_key": str(getattr(message.delivery, "routing_key", "") or ""),
            "messaging.message.conversation_id": str(props.correlation_id or ""),
            "messaging.message.body.size": len(message.body),
        }
        if props.message_id:
            attributes["messaging.message.id"] = str(props.message_id)
        with self.tracer.start_as_current_span(
            f"process {queue}", context=parent, kind=self.trace.SpanKind.CONSUMER, attributes=attributes
        ) as span:
            yield SpanHandle(span)

    @contextlib.contextmanager
    def call_span(self, captured: Iterable[Captured], model: str, inputs: int) -> Iterator[SpanHandle]:
        contexts, seen = [], set()
        for span in captured:
            if span is not None and (context := span.get_span_context()).span_id not in seen:
                seen.add(context.span_id)
                contexts.append(context)
        parent = self.trace.set_span_in_context(self.trace.NonRecordingSpan(contexts[0])) if contexts else None
        attributes: dict[str, str | int] = {
            "messaging.system": "rabbitmq",
            "messaging.batch.message_count": len(contexts),
            "gen_ai.operation.name": "embeddings",
            "gen_ai.request.model": model,
            "embed.batch.inputs": inputs,
        }
        with self.tracer.start_as_current_span(
            f"embeddings {model}",
            context=parent,
            kind=self.trace.SpanKind.INTERNAL,
            links=[self.trace.Link(context) for context in contexts],
            attributes=attributes,
        ) as span:
            yield SpanHandle(span)

    @contextlib.contextmanager
    def client_span(self, method: str, url: str) -> Iterator[SpanHandle]:
        attributes = {"http.request.method": method, "url.full": url.split("?", 1)[0]}  # a query may hold a key
        with self.tracer.start_as_current_span(method, kind=self.trace.SpanKind.CLIENT, attributes=attributes) as span:
            yield SpanHandle(span)
