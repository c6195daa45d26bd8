"""TLS to the broker: the worker reaches RabbitMQ through a TLS-terminating proxy (our own CA, made by
trustme), verifying the server certificate against AMQP_CA_FILE. RabbitMQ here listens in plain TCP, so
the proxy stands in for a TLS listener; the worker's side of the handshake is the real one."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import trustme

from tests.integration.helpers import RawCaller, assert_right_vectors
from tests.integration.proxy import Proxy
from worker.errors import ConfigurationError

pytestmark = pytest.mark.integration


@pytest.fixture
async def tls_proxy(vhost: str, tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """amqps:// URL of a TLS proxy in front of the broker, and the CA file that signs its certificate."""
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    target = urlsplit(vhost)
    proxy = await Proxy(target.hostname or "127.0.0.1", target.port or 5672, server_ctx).start()
    yield urlunsplit(target._replace(scheme="amqps", netloc=f"guest:guest@localhost:{proxy.port}")), ca_file
    await proxy.cut()


async def test_worker_connects_over_tls_with_its_ca_file(
    tls_proxy: tuple[str, Path], start_worker: Any, vhost: str
) -> None:
    url, ca_file = tls_proxy
    await start_worker(amqp_url=url, amqp_ca_file=str(ca_file))
    async with RawCaller(vhost) as caller:
        assert_right_vectors(await caller.call({"text": "over tls"}), ["over tls"])


async def test_worker_refuses_a_broker_certificate_it_cannot_verify(
    tls_proxy: tuple[str, Path], start_worker: Any
) -> None:
    url, _ = tls_proxy
    # A certificate nobody vouches for will not heal by waiting: the worker fails at once, readably (exit code 2
    # from the CLI), instead of retrying for AMQP_CONNECT_TIMEOUT_S as it would for a broker not up yet.
    with pytest.raises(ConfigurationError, match=r"TLS .* failed.*certificate verify failed"):
        await asyncio.wait_for(start_worker(amqp_url=url, amqp_connect_timeout_s=20), 15)
