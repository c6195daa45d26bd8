"""``embed-worker embed``: a few texts to the terminal, or a whole file of lines to .jsonl / .npy."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from worker.client import EmbedClient


async def print_vectors(
    url: str, texts: list[str], options: dict[str, Any], *, timeout: float, as_json: bool, lane: str = "default"
) -> None:
    async with EmbedClient(url, timeout=timeout, lane=lane) as client:
        vectors = await client.embed(texts, **options)
    for text, vec in zip(texts, vectors, strict=True):
        head = ", ".join(f"{x:.4f}" for x in vec[:4])
        if as_json:
            print(orjson.dumps({"text": text, "dimensions": len(vec), "head": head}).decode())
        else:
            print(f"{text[:40]!r}: {len(vec)} dims [{head}, ...]")


async def embed_file(
    url: str,
    path: str,
    output: str,
    options: dict[str, Any],
    *,
    timeout: float,
    chunk: int,
    concurrency: int,
    lane: str = "bulk",
) -> int:
    """Embed every non-empty line, ``chunk`` lines per request, ``concurrency`` requests at a time, on the bulk
    lane unless told otherwise (a file is ingestion: its calls go upstream after the queries of the default lane).

    Output order is input order: ``.npy`` holds one float32 matrix; ``.jsonl`` one
    ``{"line": n, "text": ..., "embedding": [...]}`` per line.
    """
    content = await asyncio.to_thread(Path(path).read_text, encoding="utf-8")
    texts = [line for line in content.splitlines() if line.strip()]
    chunks = [texts[i : i + chunk] for i in range(0, len(texts), chunk)]
    results: list[np.ndarray[Any, Any] | None] = [None] * len(chunks)
    from tqdm import tqdm

    bar = tqdm(total=len(texts), unit="text", desc="embedding")
    async with EmbedClient(url, timeout=timeout, max_in_flight=concurrency, lane=lane) as client:

        async def one(i: int) -> None:
            results[i] = await client.embed(chunks[i], binary=True, **options)
            bar.update(len(chunks[i]))

        await asyncio.gather(*(one(i) for i in range(len(chunks))))
    bar.close()
    matrix = np.concatenate([r for r in results if r is not None]) if texts else np.zeros((0, 0), np.float32)
    await asyncio.to_thread(_write, output, texts, matrix)
    return len(texts)


def _write(output: str, texts: list[str], matrix: np.ndarray[Any, Any]) -> None:
    if output.endswith(".npy"):
        np.save(output, matrix)
        return
    with open(output, "wb") as out:
        for n, (text, vec) in enumerate(zip(texts, matrix, strict=True)):
            out.write(orjson.dumps({"line": n, "text": text, "embedding": vec}, option=orjson.OPT_SERIALIZE_NUMPY))
            out.write(b"\n")
