"""Reference batching echo worker: what a Python AMQP worker that batches its broker work reaches here.

It gathers up to ``BATCH`` deliveries or ``WAIT_S``, publishes every reply (ready-made, of the requested model's
size, one vector per text) with publisher confirms, awaits the confirms together, then settles the whole batch
with ONE basic.ack(multiple=True). No upstream call and no float work: against the per-message echo
(``echo.py``) it shows what batching the acks and the confirm waits is worth; against the worker it is the
ceiling for the broker side of a batching worker. Runs on uvloop when it is installed.

Two variants, one code path (the bench runs both, alternated with the worker, issue 21):
- ``batch-echo``, the issue's reference: aiormq's write queue widened to ``WRITE_QUEUE_FRAMES`` (1,000) frames, as
  the worker widens its own (``worker.amqp.connection.widen_write_queue``);
- ``batch-echo-aiormq``: aiormq's default write queue (``FRAME_BUFFER_SIZE``, 10 frames), where a batch's 100
  publishes park on 10 slots: the reference the project's bench used before.

Run: ``python -m worker.bench.batch_echo AMQP_URL PREFETCH [WRITE_QUEUE_FRAMES]`` (no third argument: aiormq's
default).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import aio_pika
import aiormq
import numpy as np
import orjson

from worker import limits
from worker.topology import QUEUE

BATCH = 100  # deliveries per batch, as the worker's BATCH_MAX_SIZE and the API's texts per call
WAIT_S = 0.020  # how long the first delivery of a batch waits for company, as BATCH_MAX_WAIT_MS=20
# The worker's worker.amqp.connection.WRITE_QUEUE_FRAMES, written out: importing the worker's AMQP layer would add
# to this reference's start-up time (tests/bench checks the two agree).
WRITE_QUEUE_FRAMES = 1000


def _reply(model: str, dims: int, texts: int) -> bytes:
    vectors = np.full((texts, dims), 1.0 / np.sqrt(dims), dtype=np.float32)
    return orjson.dumps({"embeddings": vectors, "model": model, "dimensions": dims}, option=orjson.OPT_SERIALIZE_NUMPY)


async def main(url: str, prefetch: int, frames: int | None = None) -> None:
    if frames is not None:  # before the connection is made: aiormq sizes its queue when it builds one
        aiormq.Connection.FRAME_BUFFER_SIZE = frames
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    publish = await connection.channel(publisher_confirms=True)
    queue = await channel.get_queue(QUEUE)
    cache: dict[tuple[str, int, int], bytes] = {}
    size = min(BATCH, prefetch)  # never more unacked deliveries than the prefetch window lets in
    pending: list[aio_pika.abc.AbstractIncomingMessage] = []
    arrived = asyncio.Event()  # pending holds a delivery
    full = asyncio.Event()  # pending holds a whole batch

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        pending.append(message)  # only collect: the batch loop below does the work
        arrived.set()
        if len(pending) >= size:
            full.set()

    def reply_for(message: aio_pika.abc.AbstractIncomingMessage) -> aio_pika.Message:
        body = orjson.loads(message.body)  # read the request, as a real worker must, for the reply's size
        model = body.get("model") or "gemini-embedding-001"
        key = (model, body.get("output_dimensionality") or limits.full_dimensions(model), len(body["texts"]))
        reply = cache.get(key)
        if reply is None:
            reply = cache[key] = _reply(*key)
        return aio_pika.Message(reply, content_type="application/json", correlation_id=message.correlation_id)

    async def batches() -> None:
        while True:
            await arrived.wait()
            if len(pending) < size:  # a batch that is not full yet waits at most WAIT_S for more deliveries
                full.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(full.wait(), WAIT_S)
            batch = pending[:size]
            del pending[:size]  # what came in meanwhile starts the next batch
            if not pending:
                arrived.clear()
            # Every reply confirmed before the ack: a crash here redelivers requests, it never loses one.
            await asyncio.gather(
                *(publish.default_exchange.publish(reply_for(m), routing_key=m.reply_to or "") for m in batch)
            )
            # Deliveries come in tag order and batches are settled one after the other, so the last tag's
            # multiple ack covers this batch exactly.
            await batch[-1].ack(multiple=True)

    await queue.consume(on_message)
    print(f"ready: batch echo worker, write queue {aiormq.Connection.FRAME_BUFFER_SIZE} frames", flush=True)
    await batches()


def _run() -> None:
    args = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
    try:
        import uvloop
    except ImportError:  # plain asyncio: slower, so say so in the output
        print("uvloop not installed: batch echo on the asyncio event loop", flush=True)
        asyncio.run(main(*args))
    else:
        uvloop.run(main(*args))


if __name__ == "__main__":
    _run()
