"""Ingestion: embed every line of a file and store the vectors, without slowing the fleet's queries.

    python examples/ingest.py docs.txt --prefix doc: --amqp amqp://guest:guest@localhost/ --redis redis://localhost:6379/0

Which lane to use when:
- ``--lane deferred`` (the default here): the vectors should end up in Redis hashes. Hand over (key, text) pairs
  and return; the worker writes the vectors itself, as the Batch API at half price if it is turned on.
- ``--lane bulk``: the vectors go to a store of your own (pgvector, Qdrant, Elasticsearch; here, to show it, the
  same Redis hashes written by this script). Requests on ``embed.requests.bulk`` are ordinary RPC requests whose
  calls go upstream after the default lane's, so a search query never waits behind this backlog.
- The default lane (``embed.requests``) is for queries a person waits on: never for a backlog.

Each line of the file becomes the hash ``{prefix}{line number}`` with a ``text`` field and ``embedding`` (float32
bytes); the deferred lane also adds ``embedding_model``, ``embedding_dimensions`` and ``embedding_text_hash``.
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

    if args.lane == "bulk":
        await through_bulk(args, keys, lines, store)
    else:
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


async def through_bulk(args: argparse.Namespace, keys: list[str], lines: list[str], store: aioredis.Redis) -> None:
    """100 texts a request, 8 requests in flight, on the bulk lane; each chunk's vectors stored as they come."""
    slots = asyncio.Semaphore(8)
    async with EmbedClient(args.amqp, timeout=600, lane="bulk") as client:

        async def chunk(start: int) -> None:
            async with slots:
                texts = lines[start : start + 100]
                vectors = await client.embed(
                    texts, task_type="RETRIEVAL_DOCUMENT", output_dimensionality=args.dimensions, binary=True
                )
            async with store.pipeline(transaction=False) as pipe:
                for key, vector in zip(keys[start : start + 100], vectors, strict=True):
                    pipe.hset(key, "embedding", vector.astype("<f4").tobytes())
                await pipe.execute()

        await asyncio.gather(*(chunk(start) for start in range(0, len(lines), 100)))
    print(f"{len(lines)} items embedded on the bulk lane and stored")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--prefix", default="doc:")
    parser.add_argument("--dimensions", type=int, default=768)
    parser.add_argument("--amqp", default="amqp://guest:guest@localhost:5672/")
    parser.add_argument("--redis", default="redis://localhost:6379/0")
    parser.add_argument("--lane", choices=["deferred", "bulk"], default="deferred", help="see the top of this file")
    asyncio.run(main(parser.parse_args()))
