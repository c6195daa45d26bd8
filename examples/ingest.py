"""Bulk ingestion through the fire-and-forget lane: hand over (key, text) pairs, flush, read vectors back.

    python examples/ingest.py docs.txt --prefix doc: --amqp amqp://guest:guest@localhost/ --redis redis://localhost:6379/0

Each line of the file becomes the hash ``{prefix}{line number}`` with a ``text`` field; the worker adds
``embedding`` (float32 bytes), ``embedding_model``, ``embedding_dimensions`` and ``embedding_text_hash``.
A Redis vector index over those hashes (``FT.CREATE idx ON HASH PREFIX 1 doc: SCHEMA embedding VECTOR
FLAT 6 TYPE FLOAT32 DIM 768 DISTANCE_METRIC COSINE``) makes them searchable.
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np
import redis.asyncio as aioredis

from worker.client import EmbedClient


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


async def main(args: argparse.Namespace) -> None:
    lines = read_lines(args.file)
    keys = [f"{args.prefix}{i}" for i in range(len(lines))]
    store = aioredis.Redis.from_url(args.redis)
    async with store.pipeline(transaction=False) as pipe:  # the records themselves, as an app would have them
        for key, text in zip(keys, lines, strict=True):
            pipe.hset(key, mapping={"text": text})
        await pipe.execute()

    async with EmbedClient(args.amqp, timeout=600) as client:
        for start in range(0, len(lines), 500):  # 500 items per message
            chunk = list(zip(keys[start : start + 500], lines[start : start + 500], strict=True))
            await client.defer(chunk, task_type="RETRIEVAL_DOCUMENT", output_dimensionality=args.dimensions)
        written = await client.flush()  # or let the worker's flush interval take care of it
    print(f"{len(lines)} items handed over; this flush wrote {written} vectors")

    raw = await store.hget(keys[0], "embedding")
    if raw:
        vector = np.frombuffer(raw, dtype="<f4")
        print(f"{keys[0]}: {vector.shape[0]} dims, norm {np.linalg.norm(vector):.3f}")
    await store.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--prefix", default="doc:")
    parser.add_argument("--dimensions", type=int, default=768)
    parser.add_argument("--amqp", default="amqp://guest:guest@localhost:5672/")
    parser.add_argument("--redis", default="redis://localhost:6379/0")
    asyncio.run(main(parser.parse_args()))
