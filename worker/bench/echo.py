"""Reference echo worker: consume, reply with a ready-made vector, ack after the reply is confirmed.

It pays for the broker and the bytes (the reply has the requested dimension, built once per
dimension) but for no upstream call and no per-request float work, so it is the ceiling a Python
AMQP worker reaches on this machine. Run: ``python -m worker.bench.echo AMQP_URL PREFETCH``.
"""

from __future__ import annotations

import asyncio
import sys

import aio_pika
import numpy as np
import orjson

from worker import limits
from worker.topology import QUEUE


def _reply(dims: int, model: str) -> bytes:
    vector = np.full((1, dims), 1.0 / np.sqrt(dims), dtype=np.float32)
    return orjson.dumps({"embeddings": vector, "model": model, "dimensions": dims}, option=orjson.OPT_SERIALIZE_NUMPY)


async def main(url: str, prefetch: int) -> None:
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    publish = await connection.channel(publisher_confirms=True)
    queue = await channel.get_queue(QUEUE)
    cache: dict[tuple[str, int], bytes] = {}

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        body = orjson.loads(message.body)
        model = body.get("model") or "gemini-embedding-001"
        dims = body.get("output_dimensionality") or limits.full_dimensions(model)
        reply = cache.get((model, dims))
        if reply is None:
            reply = cache[(model, dims)] = _reply(dims, model)
        await publish.default_exchange.publish(
            aio_pika.Message(reply, content_type="application/json", correlation_id=message.correlation_id),
            routing_key=message.reply_to or "",
        )
        await message.ack()

    await queue.consume(on_message)
    print("ready: echo worker", flush=True)
    await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
