"""An asyncio caller library: publish embed requests, await replies over Direct Reply-to.

This is the caller side, so it imports aio-pika itself (the worker's own AMQP adapters are in ``worker.amqp``);
the bytes on the wire come from ``worker.messages`` and the names from ``worker.topology``, as the worker's do.
Usage::

    async with EmbedClient("amqp://guest:guest@localhost/") as client:
        vectors = await client.embed(["first text", "second text"], task_type="RETRIEVAL_DOCUMENT")

Two lanes take the same requests: ``lane="default"`` (``embed.requests``) for queries a person waits on, and
``lane="bulk"`` (``embed.requests.bulk``) for ingestion, whose calls go upstream after the default lane's. Choose
it per client (``EmbedClient(url, lane="bulk")``) or per call (``embed(..., lane="bulk")``).

Every failure is an ``EmbedClientError`` with a ``code``: the worker's error codes (``invalid_request``,
``upstream_error``, ...), or the client's own (``timeout``, ``connection_lost``, ``unreachable``,
``unroutable``, ``malformed_reply``). A timeout is also a ``TimeoutError``; a broker that answers and refuses us
(login, vhost, TLS) is an ``EmbedClientRefused``, code ``unreachable``, not retryable. The connection is robust:
when it drops, calls in flight fail at once with ``connection_lost`` (their replies were addressed to a Direct
Reply-to name that died with the channel) and later calls work again once it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from types import TracebackType
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import DeliveredMessage

from worker import tracing
from worker.amqp import codec
from worker.amqp.connection import CONNECT_ERRORS, connect_any, refusal
from worker.errors import ConfigurationError
from worker.lanes import Lane
from worker.logs import redact_url
from worker.messages import (
    FLUSH_REQUEST,
    JSON_CONTENT_TYPE,
    ErrorReply,
    MalformedReply,
    decode_flush_reply,
    decode_reply,
    encode_deferred_items,
    encode_request,
)
from worker.topology import (
    BULK_KEY,
    DEADLINE_HEADER,
    DEFERRED_KEY,
    DIRECT_REPLY_TO,
    EXCHANGE,
    FLUSH_KEY,
    ROUTING_KEY,
)
from worker.vectors import FloatArray

log = logging.getLogger(__name__)


class EmbedClientError(Exception):
    """A call failed. ``code`` is the worker's error code, or one of the client's: ``timeout``,
    ``connection_lost``, ``unreachable``, ``unroutable`` (the broker returned the request: no queue is bound to
    take it, so no worker of that lane listens), ``malformed_reply``. ``retryable``: trying again later may
    succeed."""

    def __init__(self, code: str, message: str, retryable: bool):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


class EmbedTimeout(EmbedClientError, TimeoutError):
    """No reply within the call's timeout (also a ``TimeoutError``)."""

    def __init__(self, timeout: float):
        super().__init__("timeout", f"no reply within {timeout:g} s", retryable=True)


class EmbedClientRefused(EmbedClientError):
    """The broker answered and refused us: a login it rejects, a vhost that does not exist (or this user may not
    use), a TLS failure. Code ``unreachable`` as before, but not retryable: it is a configuration to fix."""

    def __init__(self, cause: ConfigurationError):
        super().__init__("unreachable", str(cause), retryable=False)


NO_DEFERRED_WORKER = "no worker of the deferred lane is listening (is one running with REDIS_URL set?)"
LANE_KEYS = {Lane.DEFAULT: ROUTING_KEY, Lane.BULK: BULK_KEY}  # the RPC lanes a caller may choose


def lane_key(lane: str) -> str:
    """The routing key of an RPC lane, "default" or "bulk"; ValueError for any other."""
    try:
        return LANE_KEYS[Lane(lane)]
    except (ValueError, KeyError):
        raise ValueError(f"lane must be one of {', '.join(LANE_KEYS)}, not {lane!r}") from None


class EmbedClient:
    def __init__(
        self, url: str, *, timeout: float = 30.0, max_in_flight: int = 256, exchange: str = "", lane: str = "default"
    ):
        if timeout <= 0:
            raise ValueError("timeout must be a positive number of seconds")
        self._routing_key = lane_key(lane)
        self._url = url
        self._timeout = timeout
        self._exchange_name = exchange
        self._slots = asyncio.Semaphore(max_in_flight)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._pending: dict[str, asyncio.Future[DeliveredMessage]] = {}
        self._listening = asyncio.Event()  # set while the Direct Reply-to consumer is in place

    async def connect(self) -> None:
        codec.install()  # a reply with a non-UTF-8 property must not close our connection
        try:
            self._connection = await connect_any(self._url, client_properties={"connection_name": "embed-client"})
        except CONNECT_ERRORS as exc:
            where = redact_url(self._url)
            if (refused := refusal(exc, where)) is not None:
                raise EmbedClientRefused(refused) from refused
            raise EmbedClientError(
                "unreachable", f"cannot connect to the broker at {where}: {_cause(exc)}", True
            ) from None
        # Calls in flight fail the moment the connection drops: its close callbacks run on a broker's close and on
        # a dead TCP connection alike (a killed node); the channel's own closing future covers a closed channel.
        self._connection.close_callbacks.add(self._lost)
        self._channel = await self._connection.channel()
        self._channel.reopen_callbacks.add(self._reopened)
        await self._listen()

    async def _listen(self) -> None:
        """Direct Reply-to: consume the pseudo-queue, without acks, on the channel we publish from; and learn
        at once when that channel dies."""
        assert self._channel is not None
        channel = await aio_pika.Channel.get_underlay_channel(self._channel)  # type: ignore[arg-type]
        await channel.basic_consume(DIRECT_REPLY_TO, self._on_reply, no_ack=True)
        channel.closing.add_done_callback(self._lost)
        self._listening.set()

    async def _reopened(self, _: object) -> None:
        await self._listen()

    def _lost(self, *_: object) -> None:
        """The channel died: replies to calls in flight were addressed to it and will never come. New calls wait
        (within their timeout) until the connection is back and listening again."""
        self._listening.clear()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(EmbedClientError("connection_lost", "the broker connection was lost", True))

    @property
    def connected(self) -> bool:
        """Connected and listening for replies (not while the robust connection is reconnecting)."""
        return self._listening.is_set() and self._connection is not None and not self._connection.is_closed

    async def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        if self._connection is not None:
            await self._connection.close()

    async def __aenter__(self) -> EmbedClient:
        await self.connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _on_reply(self, message: DeliveredMessage) -> None:
        future = self._pending.pop(message.header.properties.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message)

    async def embed(
        self,
        texts: list[str],
        *,
        model: str | None = None,
        task_type: str | None = None,
        output_dimensionality: int | None = None,
        timeout: float | None = None,
        binary: bool = False,
        lane: str | None = None,
    ) -> FloatArray:
        """One vector per text, in order; raises ``EmbedClientError`` (``EmbedTimeout`` on timeout).

        The timeout (seconds, taken literally; None means the client's default) also becomes the request's
        ``x-deadline``, so the worker spends no upstream call on a request whose caller has stopped waiting.
        ``binary`` asks for the float32 reply encoding; ``lane`` ("default" or "bulk") overrides the client's."""
        routing_key = self._routing_key if lane is None else lane_key(lane)
        body = encode_request(
            texts,
            model=model,
            task_type=task_type,
            output_dimensionality=output_dimensionality,
            reply_encoding="float32" if binary else "json",
        )
        message = await self.request(body, timeout=timeout, routing_key=routing_key)
        props = message.header.properties
        try:
            return decode_reply(message.body, props.content_type, props.headers, count=len(texts))
        except ErrorReply as exc:
            raise EmbedClientError(exc.code, exc.message, exc.retryable) from None
        except MalformedReply as exc:
            raise EmbedClientError("malformed_reply", str(exc), False) from None

    async def defer(self, items: list[tuple[str, str]], **options: Any) -> None:
        """Hand (key, text) pairs to the fire-and-forget lane; vectors land in Redis hashes by key."""
        assert self._channel is not None, "call connect() first"
        try:
            exchange = await self._channel.get_exchange(EXCHANGE, ensure=False)
            await exchange.publish(
                aio_pika.Message(
                    encode_deferred_items(items, **options),
                    content_type=JSON_CONTENT_TYPE,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=DEFERRED_KEY,
            )
        except (aiormq.exceptions.AMQPError, RuntimeError) as exc:
            raise EmbedClientError("connection_lost", f"could not publish: {_cause(exc)}", True) from None

    async def flush(self, *, timeout: float | None = None) -> int:
        """Ask every worker's deferred lane to drain now; returns the vectors the first to answer wrote.

        Each such worker binds a queue of its own to FLUSH_KEY, so when none listens the broker returns the
        request at once: ``unroutable`` then, rather than a wait for the whole timeout."""
        try:
            message = await self.request(FLUSH_REQUEST, timeout=timeout, routing_key=FLUSH_KEY, exchange=EXCHANGE)
        except EmbedClientError as exc:
            if exc.code == "unroutable":
                raise EmbedClientError("unroutable", NO_DEFERRED_WORKER, True) from None
            raise
        try:
            return decode_flush_reply(message.body)
        except ErrorReply as exc:
            raise EmbedClientError(exc.code, exc.message, exc.retryable) from None
        except MalformedReply as exc:
            raise EmbedClientError("malformed_reply", str(exc), False) from None

    async def request(
        self, body: bytes, *, timeout: float | None = None, routing_key: str | None = None, exchange: str | None = None
    ) -> DeliveredMessage:
        """Publish one request and wait for its reply (the raw message). The request is mandatory: when no queue
        would take it, the broker returns it and this raises ``unroutable`` at once."""
        assert self._channel is not None, "call connect() first"
        routing_key = self._routing_key if routing_key is None else routing_key
        wait = self._timeout if timeout is None else timeout
        if wait <= 0:
            raise EmbedTimeout(wait)
        deadline = asyncio.get_running_loop().time() + wait
        if not self._listening.is_set():  # reconnecting: publishing now would go to a channel not yet listening
            try:
                await asyncio.wait_for(self._listening.wait(), wait)
            except TimeoutError:
                raise EmbedTimeout(wait) from None
        async with self._slots:
            cid = uuid.uuid4().hex
            future: asyncio.Future[DeliveredMessage] = asyncio.get_running_loop().create_future()
            self._pending[cid] = future
            # No AMQP expiration: a request the broker expired would land in the DLQ, which is for work worth
            # replaying. The worker honours x-deadline instead: past it, it answers without an upstream call.
            headers: dict[str, Any] = {DEADLINE_HEADER: int((time.time() + wait) * 1000)}
            tracing.inject(headers)  # traceparent of the current span, if one is (W3C Trace Context)
            message = aio_pika.Message(
                body,
                content_type=JSON_CONTENT_TYPE,
                correlation_id=cid,
                reply_to=DIRECT_REPLY_TO,
                headers=headers,
            )
            name = self._exchange_name if exchange is None else exchange
            where = f"exchange {name!r}" if name else "the default exchange"
            try:
                channel = self._channel
                target = channel.default_exchange if not name else await channel.get_exchange(name, ensure=False)
                confirmation = await target.publish(message, routing_key=routing_key, mandatory=True)
            except aiormq.exceptions.ChannelNotFoundEntity as exc:  # the broker closed the channel: 404, no exchange
                self._forget(cid, future)
                raise EmbedClientError(
                    "unroutable", f"{where} does not exist (no worker has started on this vhost?): {exc}", True
                ) from None
            except (aiormq.exceptions.AMQPError, RuntimeError) as exc:
                self._forget(cid, future)
                raise EmbedClientError("connection_lost", f"could not publish: {_cause(exc)}", True) from None
            if isinstance(confirmation, DeliveredMessage):  # basic.return: no queue is bound to take it
                self._forget(cid, future)
                raise EmbedClientError(
                    "unroutable",
                    f"the broker returned the request: no queue takes routing key {routing_key!r} on {where} "
                    "(no worker has started on this vhost?)",
                    True,
                )
            try:
                return await asyncio.wait_for(future, max(0.0, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                raise EmbedTimeout(wait) from None
            finally:
                self._pending.pop(cid, None)

    def _forget(self, cid: str, future: asyncio.Future[DeliveredMessage]) -> None:
        """A call that ends before its reply could come: drop its future (``_lost`` may have failed it already
        when the broker closed the channel; that exception is ours to drop, not asyncio's to log)."""
        self._pending.pop(cid, None)
        if future.done() and not future.cancelled():
            future.exception()
        future.cancel()


def _cause(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class SyncEmbedClient:
    """A blocking wrapper for scripts and notebooks: the async client on a private event loop thread."""

    def __init__(self, url: str, **kwargs: Any):
        import threading

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embed-client", daemon=True)
        self._thread.start()
        self._client = EmbedClient(url, **kwargs)
        self._call(self._client.connect())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def embed(self, texts: list[str], **kwargs: Any) -> FloatArray:
        result: FloatArray = self._call(self._client.embed(texts, **kwargs))
        return result

    def close(self) -> None:
        self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> SyncEmbedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
