"""Replies of both lanes (``ports.ReplyPublisher``): published on the reply connection, and the Direct Reply-to
caller probe on a connection of its own. See ``RpcReplies`` for what the broker does with a caller's name."""

from __future__ import annotations

import asyncio
import base64
import enum
import itertools
import logging
from collections.abc import Awaitable, Callable

import aiormq
from aiormq.abc import AbstractChannel
from pamqp import commands as spec

from worker.amqp.publish import LOST
from worker.amqp.seams import ReopeningPublisher
from worker.logs import safe
from worker.messages import Reply
from worker.ports import ReplyUndeliverable
from worker.topology import DIRECT_REPLY_TO_PREFIX

log = logging.getLogger(__name__)

ProbeConnect = Callable[[], Awaitable[aiormq.abc.AbstractConnection]]  # a plain connection for caller probes
CALLER_CHECK_TTL_S = 1.0
PROBE_TIMEOUT_S = 2.0  # a caller check that takes longer is inconclusive
ISOLATED_TRIES = 3  # a reply sent alone after its connection was lost, at most this often


class RpcReplies:
    """``ports.ReplyPublisher`` over the confirm channel, plus the Direct Reply-to caller probe.

    A Direct Reply-to name belongs to a channel on one node of the cluster. When that node is down, or when the
    name was forged (its process part changed), RabbitMQ 3.10 and 4.0 answer a publish to the name, or a passive
    declare of it, by closing the *whole connection* with 541 INTERNAL_ERROR (tests/e2e/test_cluster.py and
    tests/integration/test_reply_refusals.py reproduce both). So replies travel on a connection of their own, the
    probe on a third one, never on the consumer's.

    What a caller chose affects that caller only:
    - A 541 over a name is final for that name's request (the caller cannot be reached), never retried.
    - A node counts as gone (its callers' requests dropped for ``DEAD_NODE_S`` without asking the broker) only on
      evidence no caller can forge: a 541 over a name the broker itself confirmed alive before. A forged name
      was never confirmed, so it costs its own request and nothing else.
    - When the reply connection fails under several replies at once, each is sent again alone (``_isolated``):
      the one whose name makes the broker fail meets the 541 again, by itself, and the others go through.

    Returns: publishes to Direct Reply-to names are not mandatory. RabbitMQ 3.x up to 4.1 answer a mandatory
    publish to a live Direct Reply-to name with basic.return and deliver it anyway, and from 4.2 the name is
    "treated as a queue" and never returned (4.2.0 release notes, "Mandatory flag in Direct Reply-To"): on no
    version does a return say the caller has gone. Server-named queues stay mandatory: there a return does."""

    def __init__(self, publisher: ReopeningPublisher, probe: ProbeConnect | None, *, reconnect_s: float = 10.0):
        self._publisher = publisher
        self._connect_probe = probe  # None: no caller checks
        self._reconnect_s = reconnect_s  # how long a reply waits for the reply connection to come back
        # aiormq matches a returned message to its publish by message_id; a counter is cheaper than its uuid4.
        self._ids = itertools.count()
        self._probe: aiormq.abc.AbstractConnection | None = None
        self._probe_channel: AbstractChannel | None = None
        self._probe_lock = asyncio.Lock()
        self._alive_until: dict[str, float] = {}  # reply_to -> loop time until which it counts as alive
        self._confirmed: dict[str, str] = {}  # node -> a Direct Reply-to name on it the broker said was alive
        self._gone_nodes: dict[str, float] = {}  # node of a Direct Reply-to name -> loop time until which it is gone
        # Sending alone: while one reply holds this, no other publish starts, and it waits for those in flight.
        self._isolation = asyncio.Lock()
        self._in_flight = 0
        self._quiet = asyncio.Event()
        self._quiet.set()

    # ------------------------------------------------------------------ replies
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
        generation = self._publisher.generation
        try:
            await self._shared(reply_to, reply.body, properties)
            return
        except LOST as exc:
            # The channel or connection went under this reply; maybe because of it, maybe because of another.
            log.info("reply channel lost (%r); sending the reply again, alone", exc)
            lost: BaseException = exc
        for _ in range(ISOLATED_TRIES):
            if not await self._publisher.reopened_since(generation, self._reconnect_s):
                raise lost
            if self._node_gone(reply_to):
                raise ReplyUndeliverable(reply_to)
            generation = self._publisher.generation
            try:
                await self._isolated(reply_to, reply.body, properties)
                return
            except aiormq.exceptions.ConnectionInternalError as exc:
                # Alone on the connection, and the broker failed it over this name: the name is the cause.
                self._failed_over(reply_to)
                raise ReplyUndeliverable(reply_to) from exc
            except LOST as exc:  # lost again (a reply sent alone before this one was the cause): wait once more
                lost = exc
        raise lost

    async def _shared(self, reply_to: str, body: bytes, properties: spec.Basic.Properties) -> None:
        if self._isolation.locked():
            async with self._isolation:  # queue behind a reply being sent alone
                pass
        self._in_flight += 1
        self._quiet.clear()
        try:
            await self._send(reply_to, body, properties)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._quiet.set()

    async def _isolated(self, reply_to: str, body: bytes, properties: spec.Basic.Properties) -> None:
        async with self._isolation:
            await self._quiet.wait()
            await self._send(reply_to, body, properties)

    async def _send(self, reply_to: str, body: bytes, properties: spec.Basic.Properties) -> None:
        # Through the default exchange: Direct Reply-to names and server-named queues are routed there.
        await self._publisher.publish(
            body,
            exchange="",
            routing_key=reply_to,
            properties=properties,
            mandatory=not reply_to.startswith(DIRECT_REPLY_TO_PREFIX),
        )

    # ------------------------------------------------------------------ nodes
    def _node_gone(self, reply_to: str) -> bool:
        node = reply_node(reply_to)
        return node is not None and self._gone_nodes.get(node, 0.0) > asyncio.get_running_loop().time()

    def _failed_over(self, reply_to: str) -> None:
        """The broker failed a connection over ``reply_to`` alone (541): if that name was confirmed alive before,
        its node is gone; a name never confirmed may be forged, and costs only its own request."""
        node = reply_node(reply_to)
        if node is not None and self._confirmed.get(node) == reply_to:
            self._mark_gone(node)

    def _mark_gone(self, node: str) -> None:
        log.warning("the node of Direct Reply-to callers %s is gone; dropping their requests", safe(node))
        self._gone_nodes[node] = asyncio.get_running_loop().time() + DEAD_NODE_S
        self._confirmed.pop(node, None)

    def _vouch(self, reply_to: str, *, confirmed: bool) -> None:
        loop = asyncio.get_running_loop()
        if len(self._alive_until) > 10_000:
            now = loop.time()
            self._alive_until = {k: t for k, t in self._alive_until.items() if t > now}
        self._alive_until[reply_to] = loop.time() + CALLER_CHECK_TTL_S
        node = reply_node(reply_to)
        if confirmed and node is not None:
            self._confirmed[node] = reply_to  # one per node: the evidence a 541 is about the node

    # ------------------------------------------------------------------ caller probes
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
            verdict = await self._probe_name(reply_to)
            if verdict is _Probe.FAILED:
                # 541: its node is gone, or the name is forged. Only a name the broker confirmed can tell which.
                node = reply_node(reply_to)
                known = self._confirmed.get(node) if node is not None else None
                if known == reply_to or (known is not None and await self._probe_name(known) is _Probe.FAILED):
                    assert node is not None
                    self._mark_gone(node)
                return False
            if verdict is _Probe.GONE:
                return False
        # An inconclusive check vouches too: its caller is served, and the next check is one TTL away instead of
        # every request of that caller waiting out a probe in turn.
        self._vouch(reply_to, confirmed=verdict is _Probe.ALIVE)
        return True

    async def _probe_name(self, reply_to: str) -> _Probe:
        try:
            # Bounded as a whole: connecting may itself hang (a node that is still booting accepts the TCP
            # connection and answers late), and every caller check waits on the probe lock.
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                channel = await self._probe_on()
                declare = _PassiveDeclare(queue=reply_to, passive=True)
                await channel.rpc(declare, timeout=PROBE_TIMEOUT_S)  # type: ignore[attr-defined]
        except aiormq.exceptions.ChannelNotFoundEntity:
            return _Probe.GONE
        except aiormq.exceptions.ConnectionInternalError:
            self._probe = None  # the broker closed it
            return _Probe.FAILED
        except Exception as exc:  # cannot tell: assume the caller waits rather than drop its request
            log.info("caller check for %s inconclusive (%r); answering it", safe(reply_to, 60), exc)
            self._drop_probe()
            return _Probe.UNKNOWN
        return _Probe.ALIVE

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


class _Probe(enum.Enum):
    ALIVE = "declare-ok"
    GONE = "404: no such queue"
    FAILED = "541: the broker failed the connection over the name"
    UNKNOWN = "no answer in time"


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
