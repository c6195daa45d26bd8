"""The deferred lane through Gemini Batch API jobs: submit now, record in Redis, acknowledge; collect later.

A round submits one job per configuration, records it (``VectorStore.save_job``) and only then acks its
messages: from then on the record is what keeps the work from loss, and any worker's poller collects it.
Records carry no TTL, so they must live in a Redis that does not evict them (the worker warns at start otherwise).

| outcome                                          | settle / action                                            |
|--------------------------------------------------|------------------------------------------------------------|
| job submitted and recorded                       | ack                                                        |
| the submit or the record failed                  | requeue (a job submitted without its record is only a cost) |
| job finished                                     | vectors written and the record removed, in one transaction |
| job finished with some items rejected            | those items parked in ``embed.deferred.dlq``                |
| job failed as a whole, or the API no longer      | its items sent back to the queue; after 3 jobs, synchronous |
|   knows it (404 NOT_FOUND: deleted, expired)     |                                                            |
| items refused before submitting (key of another  | split off into ``embed.deferred.dlq``, as in a sync round   |
|   type, key in the reserved namespace)           |                                                            |
| a job record that cannot be read                 | skipped and logged once; the other jobs are collected      |
| a record whose items name a text it does not     | its items parked and the record dropped, logged once; the  |
|   hold (not written by this worker: altered)     |   job is not collected (its vectors could be misassigned)  |
| a record gone from Redis while its job still     | put back, logged, by a poller that read it at its previous |
|   runs (evicted, or deleted by hand)             |   poll: no worker collects a running job, so it was lost   |

A record lost before any poller read it, or after its job finished, cannot be told from a collected one: its items
are lost. To abandon a job, delete it at the API (``batches.delete``); its record then goes with its 404.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from worker import inputs, limits
from worker.admission import Admission
from worker.errors import EmbedError
from worker.lanes import Lane
from worker.logs import safe
from worker.messages import EmbedConfig, encode_deferred_in
from worker.metrics import Metrics
from worker.ports import REQUEUE, BatchJobs, DeferredQueue, JobResult, StoredVector, StoreUnavailable, VectorStore
from worker.topology import BATCH_ATTEMPTS_HEADER

from .rounds import Decoded, RoundResult, key_states, settle_message, text_hash, unchanged

log = logging.getLogger(__name__)


def attempts(headers: Mapping[str, Any], limit: int | None = None) -> int:
    """Failed Batch API jobs these items went through already: the header we set when sending them back, clamped to
    [0, ``limit``]. Any publisher can set it: a value that is neither an integer nor an integer's digits counts as
    none (such items get the usual Batch API tries), a negative one as none too."""
    value = headers.get(BATCH_ATTEMPTS_HEADER, 0)
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            value = 0
    if not isinstance(value, int) or isinstance(value, bool):
        value = 0
    value = max(0, value)
    return value if limit is None else min(value, limit)


@dataclass(frozen=True, slots=True)
class JobRecord:
    """What Redis keeps of a submitted job: the texts it was sent, in order, and the (key, text) items they serve."""

    config: EmbedConfig
    texts: list[str]
    items: list[tuple[str, str]]
    attempts: int
    # The store's clock when the round that submitted the job took its messages: the job's vectors are written only
    # where no later round has written (redis_store's write order). 0 for records from before it was kept.
    seq: int = 0

    def to_json(self) -> bytes:
        cfg = self.config
        config = {"model": cfg.model, "task_type": cfg.task_type, "output_dimensionality": cfg.output_dimensionality}
        record = {
            "config": config,
            "texts": self.texts,
            "items": self.items,
            "attempts": self.attempts,
            "seq": self.seq,
        }
        return orjson.dumps(record)

    @classmethod
    def from_json(cls, raw: bytes) -> JobRecord:
        """Raises ValueError, TypeError or KeyError for a record that is not one."""
        record = orjson.loads(raw)
        return cls(
            EmbedConfig(**record["config"]),
            [str(t) for t in record["texts"]],
            [(str(k), str(t)) for k, t in record["items"]],
            int(record["attempts"]),
            int(record.get("seq", 0)),
        )

    def consistent(self) -> bool:
        """Every item's text is one the job was sent: true of every record this worker writes."""
        texts = set(self.texts)
        return all(text in texts for _, text in self.items)

    def body(self, items: list[tuple[str, str]]) -> bytes:
        """A deferred-lane message of ``items``, in this job's configuration."""
        return encode_deferred_in(items, self.config)


class JobRounds:
    def __init__(
        self,
        jobs: BatchJobs,
        store: VectorStore,
        queue: DeferredQueue,
        *,
        skip_unchanged: bool,
        reserved_prefix: str,
        admission: Admission | None = None,
        metrics: Metrics | None = None,
    ):
        """``admission``: a job's estimated price (the Batch API's, half the sync one) is counted in the spend cap
        (UPSTREAM_USD_LIMIT) before it is submitted, in the deferred lane's place behind the queries."""
        self._admission = admission
        self._metrics = metrics
        self._jobs = jobs
        self._store = store
        self._queue = queue
        self._skip_unchanged = skip_unchanged
        self._reserved_prefix = reserved_prefix
        self._unreadable: set[str] = set()  # job records already reported as unreadable
        self._running: dict[str, bytes] = {}  # records of the jobs the last poll found running

    async def submit(self, decoded: Decoded) -> RoundResult:
        """One job per configuration, recorded in Redis, then the messages acked."""
        result = RoundResult()
        if not decoded:
            return result
        tries = max(attempts(d.headers) for d, _ in decoded)
        try:
            seq = await self._store.clock()
            keys = await key_states(self._store, decoded, self._reserved_prefix)
            by_config: dict[EmbedConfig, list[tuple[str, str]]] = {}
            for (cfg, key), state in keys.items():
                if state.refused is None:
                    state.settled_text = text = state.candidates[-1]  # handed to a job, unchanged or superseded
                    if not state.superseded and not (self._skip_unchanged and unchanged(state, text, cfg)):
                        by_config.setdefault(cfg, []).append((key, text))
            for cfg, items in by_config.items():
                texts = list(dict.fromkeys(text for _, text in items))
                name = await self._submit(texts, cfg)
                await self._store.save_job(name, JobRecord(cfg, texts, items, tries, seq).to_json())
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

    async def _submit(self, texts: list[str], cfg: EmbedConfig) -> str:
        display_name = f"embed-worker {len(texts)} texts"
        if self._admission is None:
            return await self._jobs.submit(texts, cfg, display_name=display_name)
        usd = sum(inputs.usd(text, cfg.model) for text in texts) * limits.BATCH_API_DISCOUNT
        async with self._admission.call(Lane.DEFERRED, 0, usd=usd):
            name = await self._jobs.submit(texts, cfg, display_name=display_name)
        if self._metrics is not None:
            self._metrics.spend.labels(Lane.DEFERRED, cfg.model).inc(usd)
        return name

    async def poll(self) -> int:
        """Collect finished jobs: write their vectors and forget them in one transaction. Returns vectors written."""
        records = await self._store.jobs()
        running = await self._restore_lost(records)
        written = 0
        for name, raw in records.items():
            record = self._read(name, raw)
            if record is None:
                continue
            if not record.consistent():
                await self._park_altered(name, record)
                continue
            stored = await self._collect(name, record)
            if stored is None:
                running[name] = raw
            written += stored or 0
        self._running = running
        return written

    def _read(self, name: str, raw: bytes) -> JobRecord | None:
        try:
            return JobRecord.from_json(raw)
        except (ValueError, TypeError, KeyError) as exc:
            if name not in self._unreadable:
                self._unreadable.add(name)
                log.error("Batch API job record %r cannot be read (%r); skipping it", name[:100], exc)
            return None

    async def _restore_lost(self, records: dict[str, bytes]) -> dict[str, bytes]:
        """Put back the records of jobs the last poll found running that are gone from Redis although their job
        still runs: no worker collects a running job, so the record was evicted or deleted. Returns the records
        to look for again at the next poll (those put back, and those whose job could not be read now)."""
        watch: dict[str, bytes] = {}
        for name, raw in self._running.items():
            if name in records:
                continue
            record = JobRecord.from_json(raw)  # read at the last poll
            try:
                result = await self._jobs.result(name, record.config, len(record.texts))
            except EmbedError:
                watch[name] = raw  # cannot tell now whether it still runs
                continue
            if result is None:
                log.error(
                    "Batch API job %s still runs but its record was gone from Redis (evicted? job records need a "
                    "Redis that does not evict); put back from the copy read at the last poll",
                    safe(name),
                )
                await self._store.save_job(name, raw)
                watch[name] = raw
        return watch

    async def _park_altered(self, name: str, record: JobRecord) -> None:
        """A record whose items name texts the job was not sent was altered after we wrote it: the job's outcomes
        cannot be trusted to belong to its keys. Its items go to the DLQ for an operator; the record goes."""
        reason = "Batch API job record names texts its job was not sent; job not collected"
        log.error("Batch API job %s: %s; its %d items are parked", safe(name), reason, len(record.items))
        await self._queue.park(record.body(record.items), reason)
        await self._store.drop_job(name)

    async def _collect(self, name: str, record: JobRecord) -> int | None:
        """The job's outcome applied; vectors written, or None while it runs or cannot be read."""
        try:
            result = await self._jobs.result(name, record.config, len(record.texts))
        except EmbedError as exc:
            log.info("could not read Batch API job %s: %s", safe(name), safe(exc.message))
            return None
        if result is None:
            return None
        if not result.succeeded:
            log.warning(
                "Batch API job %s ended %s; its %d items go back to the queue", name, result.state, len(record.items)
            )
            await self._queue.republish(record.body(record.items), {BATCH_ATTEMPTS_HEADER: record.attempts + 1})
            await self._store.drop_job(name)
            return 0
        return await self._write(name, record, result)

    async def _write(self, name: str, record: JobRecord, result: JobResult) -> int:
        outcome = dict(zip(record.texts, result.outcomes, strict=True))
        done: list[tuple[str, str]] = []
        bad: list[tuple[str, str]] = []
        entries: list[StoredVector] = []
        for key, text in record.items:
            vector = outcome[text]
            if isinstance(vector, EmbedError):
                bad.append((key, text))
            else:
                done.append((key, text))
                entries.append(StoredVector(key, vector, record.config.model, text_hash(text, record.config.task_type)))
        if bad:
            await self._queue.park(record.body(bad), "rejected by the Batch API")
        errors = await self._store.complete_job(name, entries, seq=record.seq)
        refused = [item for item, error in zip(done, errors, strict=True) if error is not None]
        if refused:
            reason = next(e for e in errors if e is not None)
            await self._queue.park(record.body(refused), reason)
        stored = len(done) - len(refused)
        log.info("Batch API job %s done: %d written, %d parked", name, stored, len(bad) + len(refused))
        return stored
