"""The RPC lane's side of the broker: consume ``embed.requests``, publish replies, ask after Direct Reply-to callers.

``RpcConsumer`` consumes on aiormq's channel directly (``basic_consume``): each delivery becomes an
``AmqpDelivery``, goes to the service, and the ``Settle`` it returns goes to ``settle.py``. It alone owns whether
we consume: ``pause``/``resume`` (the circuit breaker's calls) only state what is wanted, and one task makes the
broker agree, retrying with back-off when that fails; ``ready`` is true only while the two agree. After a
reconnect the robust channel is reopened and the same task consumes again on it.

``RpcReplies`` publishes replies (``ports.ReplyPublisher``) through ``publish.Publisher``, on a connection of its
own, and probes Direct Reply-to callers on a third one: see its docstring for the broker behaviour that needs it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable

import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands as spec

from worker import topology
from worker.amqp.delivery import AmqpDelivery
from worker.amqp.publish import Publisher, underlay
from worker.amqp.settle import Settler
from worker.backoff import Backoff
from worker.logs import safe
from worker.messages import Reply
from worker.ports import REQUEUE, Delivery, ReplyUndeliverable, Settle
from worker.topology import DIRECT_REPLY_TO_PREFIX

log = logging.getLogger(__name__)

Handler = Callable[[Delivery], Awaitable[Settle]]
ProbeConnect = Callable[[], Awaitable[aiormq.abc.AbstractConnection]]  # a plain connection for caller probes
CALLER_CHECK_TTL_S = 1.0
PROBE_TIMEOUT_S = 2.0  # a caller check that takes longer is inconclusive


async def handle_delivery(message: DeliveredMessage, handle: Handler, settler: Settler) -> None:
    """One delivery of ``embed.requests``: the service decides, the settler applies. Every delivery is settled:
    an unexpected error requeues it (and the quorum delivery limit parks it if it keeps failing)."""
    delivery = AmqpDelivery(message)
    try:
        settle = await handle(delivery)
    except Exception:
        log.exception("unhandled error handling correlation_id=%s", safe(delivery.correlation_id))
        settle = REQUEUE
    await settler.apply(delivery, settle, topology.QUEUE)


class RpcConsumer:
    def __init__(self, connection: AbstractRobustConnection, prefetch: int, settler: Settler, handle: Handler):
        self._connection = connection
        self._prefetch = prefetch
        self._settler = settler
        self._handle = handle
        self._robust: AbstractRobustChannel | None = None
        self._channel: aiormq.Channel | None = None
        self._consumer_tag: str | None = None
        self._want = False  # should we be consuming? (pause/resume say; stop says no, for good)
        self._stopping = False
        self._changed = asyncio.Event()
        self._reconciler: asyncio.Task[None] | None = None
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self) -> None:
        self._robust = await self._connection.channel()
        await self._robust.set_qos(prefetch_count=self._prefetch)  # per consumer: quorum queues refuse global QoS
        self._robust.reopen_callbacks.add(self._reopened)
        self._channel = await underlay(self._robust)
        self._want = True
        await self._consume()  # the first time in the open, so a start-up failure is raised to the caller
        self._reconciler = asyncio.create_task(self._reconcile())
        log.info("consuming from %s (prefetch %d)", topology.QUEUE, self._prefetch)

    # ------------------------------------------------------------------ deliveries
    async def _on_message(self, message: DeliveredMessage) -> None:
        self._inflight += 1
        self._idle.clear()
        try:
            await handle_delivery(message, self._handle, self._settler)
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._idle.set()

    @property
    def inflight(self) -> int:
        return self._inflight

    async def wait_idle(self) -> None:
        await self._idle.wait()

    # ------------------------------------------------------------------ consuming or not: one owner
    def pause(self) -> None:
        """Stop taking new deliveries for now (the upstream is failing); those in hand carry on."""
        self._want = False
        self._changed.set()

    def resume(self) -> None:
        if not self._stopping:
            self._want = True
            self._changed.set()

    @property
    def paused(self) -> bool:
        return not self._want and not self._stopping

    @property
    def ready(self) -> bool:
        """Connected, and consuming exactly when we want to (a breaker pause counts: it resumes itself)."""
        connected = self._channel is not None and not self._channel.is_closed and not self._connection.is_closed
        return connected and not self._stopping and (self._consumer_tag is not None) == self._want

    async def _reopened(self, _: object) -> None:
        """The robust connection reopened our channel on a new connection: no consumer there yet."""
        assert self._robust is not None
        self._channel = await underlay(self._robust)
        self._consumer_tag = None
        log.warning("reconnected to the broker; unacked deliveries from the old channel will be redelivered")
        self._changed.set()

    async def _reconcile(self) -> None:
        backoff = Backoff(base=0.2, cap=10.0)
        failures = 0
        while True:
            await self._changed.wait()
            self._changed.clear()
            try:
                if self._want and self._consumer_tag is None:
                    await self._consume()
                elif not self._want and self._consumer_tag is not None:
                    await self._cancel()
                failures = 0
            except Exception as exc:  # not consuming as wanted: /readyz says so until a retry works
                failures += 1
                delay = backoff.delay(failures)
                log.warning("could not %s (%r); retrying in %.1fs", "consume" if self._want else "pause", exc, delay)
                await asyncio.sleep(delay)
                self._changed.set()

    async def _consume(self) -> None:
        assert self._channel is not None
        ok = await self._channel.basic_consume(topology.QUEUE, self._on_message)
        self._consumer_tag = ok.consumer_tag

    async def _cancel(self) -> None:
        """basic.cancel: the broker stops sending; deliveries already here are still ours to settle."""
        tag, self._consumer_tag = self._consumer_tag, None
        if tag is not None and self._channel is not None and not self._channel.is_closed:
            await self._channel.basic_cancel(tag)

    async def stop(self) -> None:
        """For shutdown: cancel the consumer and never resume."""
        self._stopping = True
        self._want = False
        if self._reconciler is not None:
            self._reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconciler
        try:
            await self._cancel()
        except Exception as exc:
            log.info("consumer cancel failed (%r); closing the channel will stop it", exc)


class RpcReplies:
    """``ports.ReplyPublisher`` over the confirm channel, plus the Direct Reply-to caller probe.

    A Direct Reply-to name belongs to a channel on one node of the cluster. When that node is down, RabbitMQ 3.10
    answers a publish to the name, or a passive declare of it, by closing the *whole connection* with 541
    INTERNAL_ERROR (tests/e2e/test_cluster.py reproduces it). So replies travel on a connection of their own, the
    probe on a third one, never on the consumer's; and once a probe meets the 541 for a name, its node counts as
    gone for ``DEAD_NODE_S``: its callers are answered no more (their connections died with the node), without
    touching the broker."""

    def __init__(self, publisher: Publisher, probe: ProbeConnect | None):
        self._publisher = publisher
        self._connect_probe = probe  # None: no caller checks
        # aiormq matches a returned message to its publish by message_id; a counter is cheaper than its uuid4.
        self._ids = itertools.count()
        self._probe: aiormq.abc.AbstractConnection | None = None
        self._probe_channel: AbstractChannel | None = None
        self._probe_lock = asyncio.Lock()
        self._alive_until: dict[str, float] = {}  # reply_to -> loop time until which it counts as alive
        self._gone_nodes: dict[str, float] = {}  # node of a Direct Reply-to name -> loop time until which it is gone

    async def publish_reply(self, reply_to: str, correlation_id: str | None, reply: Reply) -> None:
        if self._node_gone(reply_to):
            raise ReplyUndeliverable(reply_to)
        properties = spec.Basic.Properties(
            content_type=reply.content_type,
            headers=reply.headers,
            correlation_id=correlation_id,
            delivery_mode=1,
            message_id=f"r{next(self._ids)}",
        )
        # Through the default exchange: Direct Reply-to names and server-named queues are routed there.
        await self._publisher.publish(
            reply.body, exchange="", routing_key=reply_to, properties=properties, mandatory=True
        )

    def _node_gone(self, reply_to: str) -> bool:
        node = reply_node(reply_to)
        return node is not None and self._gone_nodes.get(node, 0.0) > asyncio.get_running_loop().time()

    async def caller_alive(self, reply_to: str) -> bool:
        """Does this Direct Reply-to queue still have its consumer? A passive declare on a spare channel: the broker
        answers declare-ok while the caller's channel lives and 404 (closing the spare channel) once it has gone."""
        loop = asyncio.get_running_loop()
        if self._node_gone(reply_to):
            return False
        if self._alive_until.get(reply_to, 0.0) > loop.time():
            # A caller sends many requests from one channel: one probe vouches for it for a moment, so a busy
            # caller costs one round trip per CALLER_CHECK_TTL_S, not one per request.
            return True
        async with self._probe_lock:
            if self._alive_until.get(reply_to, 0.0) > loop.time():
                return True  # vouched for while we waited: a new caller's burst costs one probe, not one each
            if self._node_gone(reply_to):
                return False
            try:
                # Bounded as a whole: connecting may itself hang (a node that is still booting accepts the TCP
                # connection and answers late), and every caller check waits on this lock.
                async with asyncio.timeout(PROBE_TIMEOUT_S):
                    channel = await self._probe_on()
                    declare = _PassiveDeclare(queue=reply_to, passive=True)
                    await channel.rpc(declare, timeout=PROBE_TIMEOUT_S)  # type: ignore[attr-defined]
            except aiormq.exceptions.ChannelNotFoundEntity:
                return False
            except aiormq.exceptions.ConnectionInternalError:
                node = reply_node(reply_to)
                if node is not None:
                    log.warning("the node of Direct Reply-to callers %s is gone; dropping their requests", safe(node))
                    self._gone_nodes[node] = loop.time() + DEAD_NODE_S
                self._probe = None
                return False
            except Exception as exc:  # cannot tell: assume the caller waits rather than drop its request
                log.info("caller check for %s inconclusive (%r); answering it", safe(reply_to, 60), exc)
                self._drop_probe()
        # An inconclusive check vouches too: its caller is served, and the next check is one TTL away instead of
        # every request of that caller waiting out a probe in turn.
        if len(self._alive_until) > 10_000:
            now = loop.time()
            self._alive_until = {k: t for k, t in self._alive_until.items() if t > now}
        self._alive_until[reply_to] = loop.time() + CALLER_CHECK_TTL_S
        return True

    async def _probe_on(self) -> AbstractChannel:
        """A plain aiormq connection of its own (the broker may close it: a 404 closes the channel, a dead node's
        name the connection), opened again when needed."""
        if self._probe is None or self._probe.is_closed:
            assert self._connect_probe is not None
            self._probe = await self._connect_probe()
            self._probe_channel = None
        if self._probe_channel is None or self._probe_channel.is_closed:
            self._probe_channel = await self._probe.channel()
        return self._probe_channel

    def _drop_probe(self) -> None:
        """Forget the probe connection (the next check opens another); close it in the background."""
        probe, self._probe = self._probe, None
        if probe is not None and not probe.is_closed:
            task = asyncio.get_running_loop().create_task(probe.close())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def aclose(self) -> None:
        if self._probe is not None and not self._probe.is_closed:
            await self._probe.close()


DEAD_NODE_S = 60.0


def reply_node(reply_to: str) -> str | None:
    """The node a Direct Reply-to name's channel lives on, as RabbitMQ 3.x writes the name: the base64 of the
    channel's Erlang pid, whose first field is the node (an atom such as ``reply@34825332``). None for any other
    form (a server-named queue, or a format this does not know)."""
    if not reply_to.startswith(DIRECT_REPLY_TO_PREFIX):
        return None
    suffix = reply_to[len(DIRECT_REPLY_TO_PREFIX) :].split(".", 1)[0]
    try:
        raw = base64.b64decode(suffix + "=" * (-len(suffix) % 4), altchars=b"-_")
    except ValueError:
        return None
    # 131: external term format; 88/103: NEW_PID_EXT/PID_EXT; then the node atom, with a 2-byte (ATOM_EXT 100,
    # ATOM_UTF8_EXT 118) or 1-byte (SMALL_ATOM_EXT 115, SMALL_ATOM_UTF8_EXT 119) length.
    if len(raw) < 4 or raw[0] != 131 or raw[1] not in (88, 103):
        return None
    if raw[2] in (100, 118):
        size, start = int.from_bytes(raw[3:5], "big"), 5
    elif raw[2] in (115, 119):
        size, start = raw[3], 4
    else:
        return None
    return raw[start : start + size].decode("utf-8", "replace") or None


class _PassiveDeclare(spec.Queue.Declare):
    """queue.declare(passive) without pamqp's name check: RabbitMQ's own Direct Reply-to names end in
    base64 padding ("...==") that pamqp's queue-name pattern refuses, yet the broker answers for them."""

    def validate(self) -> None:
        return None
