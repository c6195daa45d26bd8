"""The deferred lane through Gemini Batch API jobs: submit now, record in Redis, acknowledge; collect later.

A round submits one job per configuration, records it (``VectorStore.save_job``) and only then acks its
messages: from then on the record is what keeps the work from loss, and any worker's poller collects it.

| outcome                                          | settle / action                                            |
|--------------------------------------------------|------------------------------------------------------------|
| job submitted and recorded                       | ack                                                        |
| the submit or the record failed                  | requeue (a job submitted without its record is only a cost) |
| job finished                                     | vectors written and the record removed, in one transaction |
| job finished with some items rejected            | those items parked in ``embed.deferred.dlq``                |
| job failed as a whole                            | its items sent back to the queue; after 3 jobs, synchronous |
| items refused before submitting (key of another  | split off into ``embed.deferred.dlq``, as in a sync round   |
|   type, key in the reserved namespace)           |                                                            |
| a job record that cannot be read                 | skipped and logged once; the other jobs are collected      |
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from worker.errors import EmbedError
from worker.logs import safe
from worker.messages import EmbedConfig, encode_deferred_items
from worker.ports import REQUEUE, BatchJobs, DeferredQueue, StoredVector, StoreUnavailable, VectorStore
from worker.topology import BATCH_ATTEMPTS_HEADER

from .rounds import Decoded, RoundResult, key_states, settle_message, text_hash, unchanged

log = logging.getLogger(__name__)


def attempts(decoded_headers: Any) -> int:
    """Failed Batch API jobs these items went through already (a header we set when sending them back)."""
    return int(decoded_headers.get(BATCH_ATTEMPTS_HEADER, 0) or 0)


def _config_dict(cfg: EmbedConfig) -> dict[str, Any]:
    return {"model": cfg.model, "task_type": cfg.task_type, "output_dimensionality": cfg.output_dimensionality}


def _items_body(cfg: EmbedConfig, items: list[tuple[str, str]]) -> bytes:
    return encode_deferred_items(
        items, model=cfg.model, task_type=cfg.task_type, output_dimensionality=cfg.output_dimensionality
    )


class JobRounds:
    def __init__(
        self,
        jobs: BatchJobs,
        store: VectorStore,
        queue: DeferredQueue,
        *,
        skip_unchanged: bool,
        reserved_prefix: str,
    ):
        self._jobs = jobs
        self._store = store
        self._queue = queue
        self._skip_unchanged = skip_unchanged
        self._reserved_prefix = reserved_prefix
        self._unreadable: set[str] = set()  # job records already reported as unreadable

    async def submit(self, decoded: Decoded) -> RoundResult:
        """One job per configuration, recorded in Redis, then the messages acked."""
        result = RoundResult()
        if not decoded:
            return result
        tries = max(attempts(d.headers) for d, _ in decoded)
        try:
            keys = await key_states(self._store, decoded, self._reserved_prefix)
            by_config: dict[EmbedConfig, list[tuple[str, str]]] = {}
            for (cfg, key), state in keys.items():
                if state.refused is None:
                    state.settled_text = text = state.candidates[-1]  # handed to a job, or unchanged
                    if not (self._skip_unchanged and unchanged(state, text, cfg)):
                        by_config.setdefault(cfg, []).append((key, text))
            for cfg, items in by_config.items():
                texts = list(dict.fromkeys(text for _, text in items))
                name = await self._jobs.submit(texts, cfg, display_name=f"embed-worker {len(texts)} texts")
                record = {"config": _config_dict(cfg), "texts": texts, "items": items, "attempts": tries}
                await self._store.save_job(name, orjson.dumps(record))
                log.info("Batch API job %s submitted: %d texts for %d keys", name, len(texts), len(items))
        except (StoreUnavailable, EmbedError) as exc:
            log.warning("Batch API round failed (%s); requeueing its messages", exc)
            result.settles = [(delivery, REQUEUE) for delivery, _ in decoded]
            if isinstance(exc, StoreUnavailable):
                result.store_error = exc
            return result
        for delivery, request in decoded:
            settle, split = settle_message(request, keys, {})
            if split is not None:
                result.parked.append(split)
            result.settles.append((delivery, settle))
        return result

    async def poll(self) -> int:
        """Collect finished jobs: write their vectors and forget them in one transaction. Returns vectors written."""
        written = 0
        for name, raw in (await self._store.jobs()).items():
            try:
                record = orjson.loads(raw)
                cfg = EmbedConfig(**record["config"])
                texts: list[str] = list(record["texts"])
                items: list[tuple[str, str]] = [(str(k), str(t)) for k, t in record["items"]]
                tries = int(record["attempts"])
            except (ValueError, TypeError, KeyError) as exc:
                if name not in self._unreadable:
                    self._unreadable.add(name)
                    log.error("Batch API job record %r cannot be read (%r); skipping it", name[:100], exc)
                continue
            try:
                result = await self._jobs.result(name, cfg, len(texts))
            except EmbedError as exc:
                log.info("could not read Batch API job %s: %s", safe(name), safe(exc.message))
                continue
            if result is None:
                continue
            if not result.succeeded:
                log.warning(
                    "Batch API job %s ended %s; its %d items go back to the queue", name, result.state, len(items)
                )
                await self._queue.republish(_items_body(cfg, items), {BATCH_ATTEMPTS_HEADER: tries + 1})
                await self._store.drop_job(name)
                continue
            outcome = dict(zip(texts, result.outcomes, strict=True))
            done = [(key, text) for key, text in items if not isinstance(outcome[text], EmbedError)]
            bad = [(key, text) for key, text in items if isinstance(outcome[text], EmbedError)]
            if bad:
                await self._queue.park(_items_body(cfg, bad), "rejected by the Batch API")
            entries = [StoredVector(key, outcome[text], cfg.model, text_hash(text)) for key, text in done]  # type: ignore[arg-type]
            errors = await self._store.complete_job(name, entries)
            refused = [item for item, error in zip(done, errors, strict=True) if error is not None]
            if refused:
                reason = next(e for e in errors if e is not None)
                await self._queue.park(_items_body(cfg, refused), reason)
            stored = len(done) - len(refused)
            log.info("Batch API job %s done: %d written, %d parked", name, stored, len(bad) + len(refused))
            written += stored
        return written
