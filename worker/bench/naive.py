"""The naive worker a first attempt gives: one google-genai call per message, prefetch 16.

Run: ``python -m worker.bench.naive AMQP_URL GEMINI_BASE_URL``. It is the floor the batching worker
is compared with; it uses the same SDK and emulator, only without batching.
"""

from __future__ import annotations

import asyncio
import json
import sys

import aio_pika
import httpx
from google import genai
from google.genai import types

from worker.topology import QUEUE


def sdk_client(base_url: str, timeout_s: float = 30.0) -> genai.Client:
    """The SDK client a first attempt would write, but on an explicit httpx transport: given no client of
    its own, google-genai switches its async path to aiohttp whenever aiohttp is importable (it is, as the
    worker's metrics server uses it), and that path retries connection errors on its own for 1-10 s."""
    options = types.HttpOptions(
        base_url=base_url,
        timeout=int(timeout_s * 1000),  # the SDK takes milliseconds
        httpx_async_client=httpx.AsyncClient(timeout=httpx.Timeout(timeout_s)),
    )
    return genai.Client(api_key="bench", http_options=options)


async def main(url: str, base_url: str) -> None:
    client = sdk_client(base_url)
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=16)
    queue = await channel.get_queue(QUEUE)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        model = body.get("model") or "gemini-embedding-001"
        config = types.EmbedContentConfig(output_dimensionality=body.get("output_dimensionality"))
        texts = body.get("texts") or [body["text"]]
        result = await client.aio.models.embed_content(model=model, contents=texts, config=config)
        vectors = [e.values or [] for e in result.embeddings or []]
        reply = json.dumps({"embeddings": vectors, "model": model, "dimensions": len(vectors[0])}).encode()
        await channel.default_exchange.publish(
            aio_pika.Message(reply, content_type="application/json", correlation_id=message.correlation_id),
            routing_key=message.reply_to or "",
        )
        await message.ack()

    await queue.consume(on_message)
    print("ready: naive worker", flush=True)
    await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
