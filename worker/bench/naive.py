"""The naive worker a first attempt gives: one google-genai call per message, prefetch 16.

Run: ``python -m worker.bench.naive AMQP_URL GEMINI_BASE_URL``. It is the floor the batching worker
is compared with; it uses the same SDK and emulator, only without batching.
"""

from __future__ import annotations

import asyncio
import json
import sys

import aio_pika
from google import genai
from google.genai import types


async def main(url: str, base_url: str) -> None:
    client = genai.Client(api_key="bench", http_options=types.HttpOptions(base_url=base_url))
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=16)
    queue = await channel.get_queue("embed.requests")

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = json.loads(message.body)
        model = body.get("model") or "gemini-embedding-001"
        config = types.EmbedContentConfig(output_dimensionality=body.get("output_dimensionality"))
        result = await client.aio.models.embed_content(model=model, contents=[body["text"]], config=config)
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
