"""Choosing a lane on the caller side (issue 18): the two RPC lanes by name, nothing else."""

from __future__ import annotations

import pytest

from worker import topology
from worker.client import EmbedClient, lane_key


def test_the_rpc_lanes_are_named_default_and_bulk() -> None:
    assert lane_key("default") == topology.ROUTING_KEY
    assert lane_key("bulk") == topology.BULK_KEY


@pytest.mark.parametrize("lane", ["deferred", "BULK", "", "embed.requests.bulk"])
def test_any_other_lane_is_refused_when_the_client_is_made(lane: str) -> None:
    with pytest.raises(ValueError, match="lane must be one of default, bulk"):
        EmbedClient("amqp://guest:guest@127.0.0.1/", lane=lane)
