"""The broker connection and the topology: connect (robust, TLS), declare what ``worker.topology`` names.

aio-pika's robust connection owns reconnecting: it reopens our channels on a new connection and runs their
``reopen_callbacks``, which is where the consumer and publisher pick up their new channels.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue, AbstractRobustConnection
from yarl import URL

from worker import topology
from worker.amqp import codec
from worker.backoff import Backoff
from worker.errors import BrokerUnreachable, ConfigurationError
from worker.logs import redact_url

if TYPE_CHECKING:
    from worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AmqpConfig:
    """How to reach the broker, and the arguments of the queues the worker declares (``declare_topology``)."""

    url: str
    queue_type: str = "quorum"
    delivery_limit: int = 5
    reconnect_interval: float = 5.0
    connect_timeout: float = 60.0
    quorum_group_size: int = 5
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    connection_name: str = "embed-worker"

    @classmethod
    def from_settings(cls, settings: Settings, name: str = "embed-worker") -> AmqpConfig:
        return cls(
            url=settings.amqp_url.get_secret_value(),
            queue_type=settings.queue_type,
            delivery_limit=settings.delivery_limit,
            reconnect_interval=settings.amqp_reconnect_interval_s,
            connect_timeout=settings.amqp_connect_timeout_s,
            quorum_group_size=settings.quorum_initial_group_size,
            ca_file=settings.amqp_ca_file,
            cert_file=settings.amqp_cert_file,
            key_file=settings.amqp_key_file,
            connection_name=name,
        )


# aiormq queues every outgoing frame of a connection in one asyncio.Queue of FRAME_BUFFER_SIZE (default 10) slots
# (aiormq 7.2 ``Connection.__init__``: ``asyncio.Queue(maxsize=self.FRAME_BUFFER_SIZE)``), and a publish waits for a
# free slot. A batch publishes up to 100 replies at once, so with 10 slots each reply's task parks and wakes again:
# measured, raising it to 1,000 took the worker from 0.52x to 0.9x of the batch-echo reference and its CPU per
# request from 373 to 226 µs. Memory stays bounded: at most a prefetch window of replies is ever queued.
WRITE_QUEUE_FRAMES = 1000
PLAIN_CONNECT_TIMEOUT_S = 5.0


def widen_write_queue() -> None:
    """Process-wide, because aio-pika builds its aiormq connections without a way to pass the size."""
    aiormq.Connection.FRAME_BUFFER_SIZE = max(aiormq.Connection.FRAME_BUFFER_SIZE, WRITE_QUEUE_FRAMES)


def split_urls(value: str) -> list[str]:
    """AMQP_URL may list several brokers, the nodes of one cluster, separated by commas."""
    return [part.strip() for part in value.split(",") if part.strip()]


class FailoverConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection over several broker addresses: after a failed attempt or a lost connection,
    the next attempt goes to the next address in turn (the dead node is likely the one we were on).

    aio-pika 10 has no hook per reconnect attempt: its reconnect loop calls ``RobustConnection.__connect_transport``,
    which connects to ``self.url``. This class overrides that one method, by its mangled name, to pick the address
    first; the cluster failover test (tests/e2e/test_cluster.py) fails if an aio-pika upgrade changes this. Query
    options (``?reconnect_interval=...``) are read from the first address. Upstream, connect_robust could take a
    list of URLs."""

    def __init__(self, url: URL, *args: Any, urls: Sequence[str] = (), first: int = 0, **kwargs: Any):
        super().__init__(url, *args, **kwargs)
        self._urls = [URL(u) for u in urls] or [self.url]
        self._turn = first % len(self._urls)

    def _next_address(self) -> None:
        self._turn = (self._turn + 1) % len(self._urls)

    async def _RobustConnection__connect_transport(self) -> None:
        self.url = self._urls[self._turn]
        try:
            await super()._RobustConnection__connect_transport()  # type: ignore[misc]
        except BaseException:
            self._next_address()
            raise

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if not self._close_called:
            self._next_address()
        await super()._on_connection_close(closing)


async def connect_any(urls: str, *, first: int = 0, **kwargs: Any) -> AbstractRobustConnection:
    """A robust connection to the first of ``urls`` (comma-separated) that answers, failing over in turn."""
    addresses = split_urls(urls)
    start = addresses[first % len(addresses)]
    connection: AbstractRobustConnection = await aio_pika.connect_robust(
        start, connection_class=FailoverConnection, urls=addresses, first=first, **kwargs
    )
    return connection


class PlainConnector:
    """Plain aiormq connections (no reconnects: their owner asks for another when one dies), to the first address
    that answers, starting from the one that answered last time: after a failover the next connection goes to a
    node known to be up, not back to the head of the list, which may be the node that died and is still booting."""

    def __init__(self, config: AmqpConfig, name: str):
        self._config = config
        self._name = name
        self._start = 0

    async def __call__(self) -> aiormq.abc.AbstractConnection:
        codec.install()
        widen_write_queue()
        urls = split_urls(self._config.url)
        error: Exception | None = None
        for step in range(len(urls)):
            index = (self._start + step) % len(urls)
            try:
                # Bounded per address: a node that is still booting may accept the connection and answer late.
                connection = await asyncio.wait_for(
                    aiormq.connect(
                        urls[index],
                        context=ssl_context(self._config),
                        client_properties={"connection_name": self._name},
                    ),
                    PLAIN_CONNECT_TIMEOUT_S,
                )
            except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
                error = exc
                continue
            self._start = index
            return connection
        raise error or RuntimeError("no broker address")


def ssl_context(config: AmqpConfig) -> ssl.SSLContext | None:
    if not (config.ca_file or config.cert_file):
        return None
    ctx = ssl.create_default_context(cafile=config.ca_file)
    if config.cert_file:
        ctx.load_cert_chain(config.cert_file, config.key_file)
    return ctx


async def connect(config: AmqpConfig) -> AbstractRobustConnection:
    """The first connection. A broker that does not answer *yet* is tried again (the next address of the list,
    if several) with back-off for ``connect_timeout`` seconds, each attempt logged; one that answers and refuses us
    is not (a wrong password or a missing vhost will not heal by waiting). Then the robust connection reconnects
    on its own."""
    codec.install()  # before the first frame: a peer's invalid UTF-8 must not close this connection
    widen_write_queue()
    retry = FirstConnect(redact_url(config.url), config.connect_timeout)
    while True:
        attempt = retry.next_attempt()
        try:
            return await connect_any(
                config.url,
                first=attempt - 1,  # each attempt of this loop starts at the next address
                ssl_context=ssl_context(config),
                client_properties={"connection_name": config.connection_name},
                reconnect_interval=config.reconnect_interval,
                timeout=max(1.0, min(10.0, retry.left())),
            )
        except CONNECT_ERRORS as exc:
            if (refused := refusal(exc, retry.where)) is not None:  # the broker answered no: waiting will not fix it
                raise refused from exc
            await retry.failed(str(exc) or type(exc).__name__)


class FirstConnect:
    """The wait at start for a broker that does not answer yet: back-off between attempts until ``timeout_s`` has
    passed, each attempt logged, then ``BrokerUnreachable``. The worker's ``connect`` and the gateway's share it."""

    def __init__(self, where: str, timeout_s: float):
        self.where = where
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + timeout_s
        self._backoff = Backoff(base=0.5, cap=5.0)
        self._attempt = 0

    def next_attempt(self) -> int:
        self._attempt += 1
        return self._attempt

    def left(self) -> float:
        return self._deadline - self._loop.time()

    async def failed(self, reason: str) -> None:
        """The attempt failed for ``reason``: sleep the back-off, or raise once the time is up."""
        left = self.left()
        if left <= 0:
            raise BrokerUnreachable(
                f"no broker answered at {self.where} within AMQP_CONNECT_TIMEOUT_S={self._timeout_s:g} s "
                f"({self._attempt} attempts; last: {reason})"
            )
        delay = min(left, self._backoff.delay(self._attempt))
        log.warning(
            "broker at %s not reachable (%s); attempt %d, retrying in %.1fs", self.where, reason, self._attempt, delay
        )
        await asyncio.sleep(delay)


# What connecting may raise: refused (``refusal``), or not answered yet. OSError covers ssl.SSLError.
CONNECT_ERRORS = (aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.InvalidFrameError, OSError, TimeoutError)


def refusal(exc: BaseException, where: str) -> ConfigurationError | None:
    """A broker that answered and refused us (for ``run``, ``embed`` and ``flush`` alike), or None for one that did
    not answer (worth another try)."""
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return ConfigurationError(f"the broker at {where} refused the login: {exc}")
    if isinstance(exc, aiormq.exceptions.InvalidFrameError):
        # RabbitMQ closes the connection instead of answering connection.open for a vhost that does not exist
        # (or that the user may not use); aiormq reports that as an unexpected frame.
        return ConfigurationError(
            f"the broker at {where} closed the connection while opening it: the vhost does not exist, or this "
            "user has no access to it"
        )
    if (tls := exc if isinstance(exc, ssl.SSLError) else _tls_error(exc)) is not None:
        # aiormq wraps it: a bad certificate does not heal by waiting
        return ConfigurationError(f"TLS to {where} failed: {tls}")
    return None


def _tls_error(exc: BaseException) -> ssl.SSLError | None:
    """The SSLError behind a connection error, if any: aiormq raises AMQPConnectionError with it among the args
    or as the cause."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLError):
            return item
        todo += [item.__cause__, item.__context__, *item.args]
    return None


async def declare_topology(connection: AbstractConnection, config: AmqpConfig) -> AbstractChannel:
    """Declare what ``worker.topology`` names; returns the channel (robust: it declares again after a reconnect).

    Both RPC lanes' queues (``embed.requests``, ``embed.requests.bulk``) and ``embed.deferred`` take the same
    arguments (``config.queue_type``, its delivery limit and replicas), each with a dead-letter queue of its own.
    A queue is declared with its full arguments only when it does not exist yet; an existing one is used as it
    is (a passive declare). RabbitMQ refuses a declare whose arguments differ from the queue's, so adding one
    (``x-quorum-initial-group-size`` came later than the first workers) must not break a rolling upgrade; to change
    the arguments of an existing queue, use a policy or recreate it.

    The six existence probes (three round trips each, on channels of their own) run at once, beside the two
    exchange declarations; what remains runs in turn on the one channel (a channel answers one call at a time),
    so that the robust channel declares it all again after a reconnect."""
    channel = await connection.channel()
    names = [queue for name, _, dlq in WORK_QUEUES for queue in (dlq, name)]
    probes = asyncio.gather(*(_exists(connection, name) for name in names))
    exchange, dlx, found = await asyncio.gather(
        channel.declare_exchange(topology.EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True),
        channel.declare_exchange(topology.DLX, aio_pika.ExchangeType.DIRECT, durable=True),
        probes,
    )
    exists = dict(zip(names, found, strict=True))
    queue_type = config.queue_type
    replicas = {"x-quorum-initial-group-size": config.quorum_group_size} if queue_type == "quorum" else {}
    for name, key, dlq in WORK_QUEUES:
        dead = await _queue(channel, dlq, {"x-queue-type": queue_type, **replicas}, exists=exists[dlq])
        await dead.bind(dlx, routing_key=key)
        arguments = topology.queue_arguments(queue_type, config.delivery_limit, dead_letter_key=key)
        queue = await _queue(channel, name, {**arguments, **replicas}, exists=exists[name])
        await queue.bind(exchange, routing_key=key)
    return channel


# (queue, its routing key, which is also its dead letters' key, its dead-letter queue)
WORK_QUEUES = (
    (topology.QUEUE, topology.ROUTING_KEY, topology.DLQ),
    (topology.BULK_QUEUE, topology.BULK_KEY, topology.BULK_DLQ),
    (topology.DEFERRED_QUEUE, topology.DEFERRED_KEY, topology.DEFERRED_DLQ),
)


async def _queue(channel: AbstractChannel, name: str, arguments: dict[str, Any], *, exists: bool) -> AbstractQueue:
    if exists:
        return await channel.declare_queue(name, passive=True)
    return await channel.declare_queue(name, durable=True, arguments=arguments)


async def _exists(connection: AbstractConnection, name: str) -> bool:
    """A passive declare on a throwaway aiormq channel: the broker closes the channel it answers 404 on."""
    transport = connection.transport
    assert transport is not None
    probe = await transport.connection.channel()
    try:
        await probe.queue_declare(name, passive=True)
        return True
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        if not probe.is_closed:
            await probe.close()


async def declare_once(url: str, queue_type: str = "quorum", delivery_limit: int = 5, group_size: int = 5) -> None:
    """Declare the topology and disconnect: for tools that publish before any worker runs (the bench, tests)."""
    codec.install()
    connection = await aio_pika.connect(split_urls(url)[0])
    try:
        await declare_topology(connection, AmqpConfig(url, queue_type, delivery_limit, quorum_group_size=group_size))
    finally:
        await connection.close()
