"""Caller probes open plain connections through PlainConnector: bounded per address, and after a failover the
next connection goes to the node that answered, not back to a head of the list that accepts and never speaks
(a node still booting)."""

from __future__ import annotations

import asyncio

import pytest

from worker.amqp import connection as amqp_connection
from worker.amqp.connection import AmqpConfig, PlainConnector

pytestmark = pytest.mark.integration


async def test_a_silent_first_address_is_skipped_in_bounded_time_and_then_avoided(
    vhost: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accept the TCP connection, never say a word of AMQP

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setattr(amqp_connection, "PLAIN_CONNECT_TIMEOUT_S", 0.5)
    config = AmqpConfig(
        url=f"amqp://guest:guest@127.0.0.1:{port}/x,{vhost}",
        queue_type="classic",
        delivery_limit=5,
        reconnect_interval=1,
    )
    connect = PlainConnector(config, "probe-test")
    try:
        first = await asyncio.wait_for(connect(), 5)  # the silent node costs at most the bound, then the broker
        assert len(accepted) == 1
        await first.close()
        second = await asyncio.wait_for(connect(), 5)
        assert len(accepted) == 1  # straight to the node that answered
        await second.close()
    finally:
        for writer in accepted:
            writer.close()
        server.close()
