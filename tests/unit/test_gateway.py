"""The gateway's server without a broker (a fake ``EmbedClient`` answers float32 replies): keys, limits, slow
clients, the in-flight bound, lanes and timeouts on the wire; settings and the start-up exit codes."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.header import ContentHeader
from pydantic import ValidationError

from worker.client import EmbedClient
from worker.errors import EmbedError, ErrorCode
from worker.gateway.app import Running, listen
from worker.gateway.settings import GatewaySettings
from worker.messages import encode_error, encode_vectors

KEY = "unit-key"
BODY = {"model": "gemini-embedding-001", "input": ["a", "b"], "dimensions": 128}


class FakeClient(EmbedClient):
    """Answers every request with vectors (float32 reply), or holds it until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__("amqp://guest:guest@127.0.0.1:1/")
        self.calls: list[tuple[dict[str, Any], float | None, str | None]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.error: EmbedError | None = None
        self.arrived = asyncio.Condition()  # notified at each request

    @property
    def connected(self) -> bool:
        return True

    async def request(
        self, body: bytes, *, timeout: float | None = None, routing_key: str | None = None, exchange: str | None = None
    ) -> DeliveredMessage:
        request = orjson.loads(body)
        self.calls.append((request, timeout, routing_key))
        async with self.arrived:
            self.arrived.notify_all()
        await self.release.wait()
        count = len(request.get("texts") or request.get("inputs"))
        if self.error is not None:
            reply = encode_error(self.error)
        else:
            reply = encode_vectors(np.ones((count, 4), np.float32), request["model"], "float32")
        props = Basic.Properties(content_type=reply.content_type, headers=reply.headers)
        return DeliveredMessage(Basic.Deliver(), ContentHeader(properties=props), reply.body, None)  # type: ignore[arg-type]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Any]]:
    running: list[Running] = []

    async def start(**overrides: Any) -> tuple[str, FakeClient, Running]:
        values = {"gateway_host": "127.0.0.1", "gateway_port": 0, "gateway_api_keys": KEY, **overrides}
        client = FakeClient()
        gateway = await listen(GatewaySettings(_env_file=None, **values), client)  # type: ignore[call-arg]
        running.append(gateway)
        return f"http://127.0.0.1:{gateway.port}", client, gateway

    yield start
    for gateway in running:
        await gateway.aclose(1.0)


def auth(key: str = KEY, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


async def test_keys_lanes_and_the_callers_timeout(serve: Any) -> None:
    url, client, _ = await serve(gateway_api_keys=f"other,{KEY}", gateway_request_timeout_s=30)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/embeddings", json=BODY, headers=auth("wrong")) as response:
            assert response.status == 401
            assert (await response.json())["error"]["code"] == "invalid_api_key"
        async with session.post(f"{url}/v1/embeddings", json=BODY) as response:
            assert response.status == 401
        headers = auth(**{"X-Embed-Lane": "bulk", "x-stainless-read-timeout": "7"})
        async with session.post(f"{url}/v1/embeddings", json=BODY, headers=headers) as response:
            assert response.status == 200, await response.text()
            assert len((await response.json())["data"]) == 2
        async with session.post(f"{url}/v1/embeddings", json=BODY, headers=auth(**{"X-Embed-Lane": "x"})) as response:
            assert response.status == 400
    [(request, timeout, routing_key)] = client.calls
    assert routing_key == "embed.requests.bulk"
    assert timeout is not None and 0 < timeout <= 7  # the SDK's own, shorter timeout; it becomes the x-deadline
    assert request["reply_encoding"] == "float32"


async def test_anonymous_gateway_checks_no_key(serve: Any) -> None:
    url, _, _ = await serve(gateway_api_keys="", gateway_allow_anonymous=True)
    async with aiohttp.ClientSession() as session, session.post(f"{url}/v1/embeddings", json=BODY) as response:
        assert response.status == 200


async def test_past_max_in_flight_is_429_at_once(serve: Any) -> None:
    url, client, gateway = await serve(gateway_max_in_flight=2)
    client.release.clear()
    async with aiohttp.ClientSession() as session:
        held = [asyncio.create_task(session.post(f"{url}/v1/embeddings", json=BODY, headers=auth())) for _ in range(2)]
        async with client.arrived:  # both are with the (held) client
            await asyncio.wait_for(client.arrived.wait_for(lambda: len(client.calls) == 2), 10)
        assert gateway.gateway.in_flight == 2
        async with session.post(f"{url}/v1beta/models/gemini-embedding-001:embedContent", headers=auth()) as refused:
            assert refused.status == 429 and refused.headers["Retry-After"] == "1"
            assert (await refused.json())["error"]["status"] == "RESOURCE_EXHAUSTED"  # in its route's shape
        client.release.set()
        for task in held:
            async with await task as response:
                assert response.status == 200
    assert len(client.calls) == 2 and gateway.gateway.in_flight == 0


async def test_bodies_are_bounded_and_slow_clients_cut_off(serve: Any) -> None:
    url, client, _ = await serve(max_body_bytes=2048, gateway_client_timeout_s=0.3)
    big = orjson.dumps({**BODY, "input": ["x" * 4000]})
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/embeddings", data=big, headers=auth()) as response:
            assert response.status == 413  # announced by Content-Length: refused before reading it

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(5):
                yield b"x" * 1000

        async with session.post(f"{url}/v1/embeddings", data=chunks(), headers=auth()) as response:
            assert response.status == 413  # chunked, no length: cut off once past the limit

        async def trickle() -> AsyncIterator[bytes]:
            yield b'{"model": '
            await asyncio.sleep(30)  # never finishes within the client timeout
            yield b"}"

        async with session.post(f"{url}/v1/embeddings", data=trickle(), headers=auth()) as response:
            assert response.status == 408
    assert client.calls == []


async def test_worker_errors_reach_the_caller_and_the_user_is_logged_escaped(
    serve: Any, caplog: pytest.LogCaptureFixture
) -> None:
    url, client, _ = await serve()
    client.error = EmbedError("the API budget has no room", retryable=True, code=ErrorCode.RATE_LIMITED)
    caplog.set_level(logging.INFO, "worker.gateway")
    body = {**BODY, "user": "mallory\ninjected line"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/embeddings", json=body, headers=auth()) as response,
    ):
        assert response.status == 429 and response.headers["Retry-After"] == "10"
        assert (await response.json())["error"]["code"] == "rate_limited"
    assert "user mallory\\ninjected line" in caplog.text
    assert KEY not in caplog.text


async def test_health_metrics_and_unknown_paths(serve: Any) -> None:
    url, _, _ = await serve()
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/readyz") as response:
            assert response.status == 200
        async with session.get(f"{url}/v1/embeddings", headers=auth()) as response:
            assert response.status == 405 and response.headers["Allow"] == "POST"
        async with session.post(f"{url}/v1/nothing", headers=auth()) as response:
            assert response.status == 404 and "error" in await response.json()
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
    assert 'embed_gateway_requests_total{route="openai.embeddings",status="405"} 1.0' in text
    assert 'embed_gateway_requests_total{route="other",status="404"} 1.0' in text


def test_settings_need_keys_or_anonymous_and_split_keys() -> None:
    with pytest.raises(ValidationError, match="GATEWAY_API_KEYS is not set"):
        GatewaySettings(_env_file=None)  # type: ignore[call-arg]
    settings = GatewaySettings(_env_file=None, gateway_api_keys=" k1, k2 ")  # type: ignore[call-arg,arg-type]
    assert [k.get_secret_value() for k in settings.gateway_api_keys] == ["k1", "k2"]
    assert "k1" not in repr(settings) and "k1" not in str(settings.model_dump())
    with pytest.raises(ValidationError, match="empty key"):
        GatewaySettings(_env_file=None, gateway_api_keys="k1,,k2")  # type: ignore[call-arg,arg-type]
    assert "gemini-embedding-2" in GatewaySettings(_env_file=None, gateway_allow_anonymous=True).models  # type: ignore[call-arg]


def run_gateway_process(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", **env}
    return subprocess.run(
        [sys.executable, "-m", "worker.gateway", *args],
        check=False,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("env", "args", "fragment"),
    [
        ({}, (), "GATEWAY_API_KEYS is not set"),
        ({"GATEWAY_API_KEYS": "k", "GATEWAY_PORT": "99999"}, (), "GATEWAY_PORT"),
        ({"GATEWAY_API_KEYS": "k", "AMQP_URL": "http://x"}, (), "AMQP_URL"),
        ({"GATEWAY_API_KEYS": "k"}, ("--port", "70000"), "GATEWAY_PORT"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2(env: dict[str, str], args: tuple[str, ...], fragment: str) -> None:
    result = run_gateway_process(env, *args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_no_broker_is_retried_then_exit_1() -> None:
    result = run_gateway_process(
        {"GATEWAY_API_KEYS": "secret-key-x", "AMQP_URL": "amqp://u:pw-x@127.0.0.1:1/", "AMQP_CONNECT_TIMEOUT_S": "0.6"}
    )
    assert result.returncode == 1, result.stderr
    assert "no broker answered" in result.stderr and "retrying" in result.stderr  # each attempt logged
    assert "secret-key-x" not in result.stderr and "pw-x" not in result.stderr
