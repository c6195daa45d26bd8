"""The gateway's Prometheus metrics, served on its own port at ``/metrics`` (a registry per object, so that several
in-process gateways in tests keep apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds: from a few milliseconds (a batch that fills at once) to the default request timeout and past it.
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        # route: openai.embeddings, gemini.batchEmbedContents, gemini.embedContent, other
        self.requests = Counter(
            "embed_gateway_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r
        )
        self.seconds = Histogram(
            "embed_gateway_request_seconds",
            "From a request's head to its answer, by route",
            ["route"],
            buckets=_SECONDS,
            registry=r,
        )
        self.in_flight = Gauge(
            "embed_gateway_in_flight", "Requests being served (GATEWAY_MAX_IN_FLIGHT bounds it)", registry=r
        )
        self.ready = Gauge("embed_gateway_ready", "1 while connected to the broker", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
