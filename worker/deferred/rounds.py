"""One synchronous round of the deferred lane: messages in, vectors written, a ``Settle`` per message out.

| outcome for a message                                               | settle                                   |
|---------------------------------------------------------------------|------------------------------------------|
| not a valid request                                                 | dead-letter                              |
| every item written, unchanged, or superseded by a written text      | ack                                      |
| some items refused (the API rejects the text, the key holds another | those items split off into the DLQ with  |
|   type, the key is in the worker's reserved namespace); rest done   |   their reason (``x-embed-error``); ack  |
| every item refused                                                  | dead-letter with the reason              |
| an item's upstream call failed after its retry budget               | requeue (the delivery limit parks it)    |
| Redis unavailable, or refusing writes as a whole (full, read-only)  | requeue the whole round; the lane pauses |

Order: a key gets the vector of its last item in the round, whatever configuration each item asked for (items
count in the order the round took its messages); across rounds, and against Batch API jobs, the store keeps the
vector of the round that took its messages last (``redis_store``: ``embedding_seq``).

Savings: within a round a key is embedded once (its latest text wins), identical texts of one configuration
share one upstream slot, and (``DEFERRED_SKIP_UNCHANGED``) keys whose hash already holds an embedding of the
same text, task type, model and dimension are skipped. If the API rejects a key's latest text, the key falls back
to its latest earlier item of the round: a good text superseded by a bad one is still written, never silently
lost. When the store refuses a round's write as a whole, the vectors that round paid for are kept in memory
(``PaidVectors``, bounded in bytes) and written when its messages come back, instead of being embedded again.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from worker.batcher import Batcher
from worker.budgets import BatchingConfig
from worker.errors import EmbedError, InvalidRequest
from worker.inputs import EmbedInput
from worker.lanes import Call, Lane
from worker.logs import safe
from worker.messages import DeferredRequest, EmbedConfig, RequestLimits, decode_deferred, encode_deferred_in
from worker.ports import (
    ACK,
    REQUEUE,
    BatchEmbedder,
    Delivery,
    Existing,
    Settle,
    StoredVector,
    StoreUnavailable,
    VectorStore,
    dead_letter,
)
from worker.vectors import FloatArray, as_array

log = logging.getLogger(__name__)

# An outcome with its vector parsed: the store writes numbers (``ports.Outcome`` may hold the API's JSON).
_Parsed = FloatArray | EmbedError

Decoded = list[tuple[Delivery, DeferredRequest]]
KeyId = tuple[EmbedConfig, str]


@dataclass
class RoundResult:
    settles: list[tuple[Delivery, Settle]] = field(default_factory=list)
    parked: list[tuple[bytes, str]] = field(default_factory=list)  # items split off messages, and why
    written: int = 0
    store_error: StoreUnavailable | None = None  # the scheduler pauses the lane and answers flushes with it


@dataclass
class KeyState:
    """One key of a round under one configuration: its texts in arrival order, and what became of it."""

    candidates: list[str] = field(default_factory=list)  # distinct texts, oldest first; the last one is wanted
    arrivals: list[int] = field(default_factory=list)  # where each candidate last came in the round's item order
    existing: Existing = field(default_factory=Existing)
    settled_text: str | None = None  # the text whose vector the key holds or will hold (written, unchanged, in a job)
    refused: str | None = None  # why the key takes no vector at all
    transient: bool = False  # the wanted text failed upstream, but may succeed another time
    superseded: bool = False  # the key's last item in the round asked for another configuration

    def add(self, text: str, position: int) -> None:
        if text in self.candidates:
            i = self.candidates.index(text)
            del self.candidates[i], self.arrivals[i]
        self.candidates.append(text)
        self.arrivals.append(position)

    def drop_wanted(self) -> None:
        """The wanted text was rejected: the one before it is wanted now."""
        self.candidates.pop()
        self.arrivals.pop()

    @property
    def last_arrival(self) -> int:
        return self.arrivals[-1] if self.arrivals else -1


def text_hash(text: str, task_type: str | None = None) -> str:
    """What ``embedding_text_hash`` holds: BLAKE2b-128 of the text, keyed with the task type when there is one (the
    same words under another task are another input to the model), in hex."""
    key = task_type.encode() if task_type else b""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16, key=key).hexdigest()


def decode_round(deliveries: Sequence[Delivery], request_limits: RequestLimits) -> tuple[Decoded, RoundResult]:
    """The valid requests, and a result that already dead-letters the invalid ones."""
    decoded: Decoded = []
    result = RoundResult()
    for delivery in deliveries:
        try:
            request = decode_deferred(
                delivery.body,
                content_type=delivery.content_type,
                content_encoding=delivery.content_encoding,
                request_limits=request_limits,
            )
        except InvalidRequest as exc:
            log.warning("invalid deferred request (message_id=%s): %s", safe(delivery.message_id), safe(exc.message))
            result.settles.append((delivery, dead_letter("invalid_request", f"invalid_request: {exc.message}")))
            continue
        decoded.append((delivery, request))
    return decoded, result


async def key_states(store: VectorStore, decoded: Decoded, reserved_prefix: str) -> dict[KeyId, KeyState]:
    """Every key of the round, its texts, what Redis holds for it, and whether it can take a vector at all. A state
    is ``superseded`` when its key's last item in the round came under another configuration."""
    keys: dict[KeyId, KeyState] = {}
    position = itertools.count()
    for _, request in decoded:
        for key, text in zip(request.keys, request.texts, strict=True):
            keys.setdefault((request.config, key), KeyState()).add(text, next(position))
    latest = set(latest_by_key(keys, keys))
    for kid, state in keys.items():
        state.superseded = kid not in latest
        if reserved_prefix and kid[1].startswith(reserved_prefix):
            # The worker keeps its own state under this prefix (Batch API jobs, the cache, rate limits).
            state.refused = f"key {kid[1][:100]!r} is in the worker's reserved namespace {reserved_prefix!r}"
    open_keys = [kid for kid, state in keys.items() if state.refused is None]
    for kid, have in zip(open_keys, await store.existing([key for _, key in open_keys]), strict=True):
        keys[kid].existing = have
        keys[kid].refused = have.error
    return keys


def latest_by_key(keys: dict[KeyId, KeyState], among: Iterable[KeyId]) -> list[KeyId]:
    """Of the states ``among``, per key the one whose wanted text came last in the round."""
    latest: dict[str, KeyId] = {}
    for kid in among:
        best = latest.get(kid[1])
        if best is None or keys[kid].last_arrival > keys[best].last_arrival:
            latest[kid[1]] = kid
    return list(latest.values())


def unchanged(state: KeyState, text: str, config: EmbedConfig) -> bool:
    """The key holds this text's vector already: same text and task type (the hash), model and dimension."""
    have = state.existing
    return (
        have.text_hash == text_hash(text, config.task_type)
        and have.model == config.model
        and have.dimensions == config.dimensions
    )


def settle_by_key(keys: dict[KeyId, KeyState]) -> None:
    """A key's other states follow the one that decided it: a refusal of the key is every state's; once it holds
    the round's vector (written or unchanged) their items are done, superseded by it; else they come back with it."""
    states: dict[str, list[KeyState]] = {}
    for (_, key), state in keys.items():
        states.setdefault(key, []).append(state)
    for group in states.values():
        refused = next((state.refused for state in group if state.refused is not None), None)
        done = any(state.settled_text is not None for state in group)
        for state in group:
            if refused is not None:
                state.refused = refused
            elif done and state.settled_text is None and state.candidates:
                state.settled_text = state.candidates[-1]


def settle_message(
    request: DeferredRequest, keys: dict[KeyId, KeyState], rejected: dict[tuple[EmbedConfig, str], EmbedError]
) -> tuple[Settle, tuple[bytes, str] | None]:
    """What becomes of one message, and the items to split off it (a body for the DLQ, and why)."""
    failed: list[tuple[str, str, str]] = []
    transient = False
    for key, text in zip(request.keys, request.texts, strict=True):
        state = keys[(request.config, key)]
        error = rejected.get((request.config, text))
        if state.refused is not None:
            failed.append((key, text, state.refused))
        elif error is not None:
            failed.append((key, text, f"{error.code}: {error.message}"))
        elif state.transient or state.settled_text is None:
            transient = True  # this item's key is not written yet: try the message again
    if transient:
        return REQUEUE, None
    if not failed:
        return ACK, None
    reason = failed[0][2] + (f" (and {len(failed) - 1} more items)" if len(failed) > 1 else "")
    if len(failed) == len(request.keys):
        return dead_letter("bad_item", reason), None
    body = encode_deferred_in([(k, t) for k, t, _ in failed], request.config)
    return ACK, (body, reason)


class PaidVectors:
    """Vectors a round paid for and could not write because the store refused the write as a whole (full,
    read-only, gone), kept to be written when the round's messages come back instead of being embedded again.

    At most ``limit`` bytes: past it, a vector is not kept (its text will be embedded again, or found in the cache).
    Dropped by ``forget`` once the lane finds its queue empty: messages not back by then went to another worker."""

    def __init__(self, limit: int):
        self.limit = limit
        self.bytes = 0
        self._vectors: dict[tuple[EmbedConfig, str], FloatArray] = {}

    def keep(self, paid: Iterable[tuple[EmbedConfig, str, FloatArray]]) -> int:
        """Keep what fits; returns how many were kept."""
        kept = 0
        for config, text, vector in paid:
            if (config, text) in self._vectors or self.bytes + vector.nbytes > self.limit:
                continue
            self._vectors[(config, text)] = vector.copy()  # not a view: a row must not hold its whole batch
            self.bytes += vector.nbytes
            kept += 1
        return kept

    def take(self, config: EmbedConfig, text: str) -> FloatArray | None:
        vector = self._vectors.pop((config, text), None)
        if vector is not None:
            self.bytes -= vector.nbytes
        return vector

    def forget(self) -> None:
        self._vectors.clear()
        self.bytes = 0


@dataclass(frozen=True, slots=True)
class Planned:
    """A vector the round has for a key: the state it serves, its text, and the entry for the store."""

    kid: KeyId
    text: str
    entry: StoredVector


class SyncRounds:
    def __init__(
        self,
        store: VectorStore,
        upstream: BatchEmbedder,
        *,
        batch_max_size: int,
        max_concurrent: int,
        skip_unchanged: bool,
        reserved_prefix: str,
        paid_bytes: int,
        batching: BatchingConfig | None = None,
    ):
        self._store = store
        self._upstream = upstream
        self._skip_unchanged = skip_unchanged
        self._reserved_prefix = reserved_prefix
        self._paid = PaidVectors(paid_bytes)
        self._batcher: Batcher[EmbedConfig, EmbedInput, _Parsed] = Batcher(
            self._embed_batch,
            max_size=batch_max_size,
            max_wait=0,
            max_concurrent=max_concurrent,
            weigh=batching.weighing if batching is not None else None,
            budgets=batching.budgets if batching is not None else (),
        )

    async def _embed_batch(self, config: EmbedConfig, texts: list[EmbedInput]) -> list[_Parsed]:
        outcomes = await self._upstream.embed(texts, config, Call(Lane.DEFERRED))  # ingestion: after the queries
        # The store writes numbers: parse here, once (and let go of the API's response body)
        return [o if isinstance(o, EmbedError) else as_array(o) for o in outcomes]

    def drained(self) -> None:
        """The lane found its queue empty: vectors kept for messages that did not come back here are not needed."""
        self._paid.forget()

    async def run(self, decoded: Decoded) -> RoundResult:
        result = RoundResult()
        if not decoded:
            return result
        rejected: dict[tuple[EmbedConfig, str], EmbedError] = {}
        planned: list[Planned] = []
        try:
            seq = await self._store.clock()
            keys = await key_states(self._store, decoded, self._reserved_prefix)
            planned = await self._embed_keys(keys, rejected)
            errors = await self._store.write([p.entry for p in planned], seq) if planned else []
        except StoreUnavailable as exc:
            self._keep(planned)
            result.settles = [(delivery, REQUEUE) for delivery, _ in decoded]
            result.store_error = exc
            return result
        for plan, error in zip(planned, errors, strict=True):
            if error is None:
                keys[plan.kid].settled_text = plan.text
                result.written += 1
            else:
                keys[plan.kid].refused = error
        settle_by_key(keys)
        for delivery, request in decoded:
            settle, split = settle_message(request, keys, rejected)
            if settle.reason or split is not None:
                reason = settle.reason or (split[1] if split else "")
                log.warning("deferred message %s: items parked (%s)", safe(delivery.message_id), safe(reason))
            if split is not None:
                result.parked.append(split)
            result.settles.append((delivery, settle))
        log.info("deferred round: %d messages, %d keys, %d written", len(decoded), len(keys), result.written)
        return result

    def _keep(self, planned: list[Planned]) -> None:
        if not planned:
            return
        kept = self._paid.keep((p.kid[0], p.text, p.entry.vector) for p in planned)
        log.warning(
            "kept %d of the round's %d vectors (%.1f MiB in all) in memory until the store takes writes again",
            kept,
            len(planned),
            self._paid.bytes / 2**20,
        )

    async def _embed_keys(
        self, keys: dict[KeyId, KeyState], rejected: dict[tuple[EmbedConfig, str], EmbedError]
    ) -> list[Planned]:
        """Embed each key's last text of the round; a text the API rejects makes its key fall back to its item
        before, under whichever configuration that came."""
        planned: list[Planned] = []
        todo = [kid for kid, state in keys.items() if state.refused is None]
        while todo:
            wanted: dict[KeyId, str] = {}
            for kid in latest_by_key(keys, todo):
                state, text = keys[kid], keys[kid].candidates[-1]
                if self._skip_unchanged and unchanged(state, text, kid[0]):
                    state.settled_text = text
                else:
                    wanted[kid] = text
            outcomes = await self._embed(wanted)
            again: set[str] = set()
            for kid, text in wanted.items():
                outcome = outcomes[(kid[0], text)]
                state = keys[kid]
                if not isinstance(outcome, EmbedError):
                    entry = StoredVector(kid[1], outcome, kid[0].model, text_hash(text, kid[0].task_type))
                    planned.append(Planned(kid, text, entry))
                elif outcome.retryable:
                    state.transient = True
                else:
                    rejected[(kid[0], text)] = outcome
                    state.drop_wanted()
                    again.add(kid[1])
            todo = [kid for kid in todo if kid[1] in again and keys[kid].candidates]
        return planned

    async def _embed(self, wanted: dict[KeyId, str]) -> dict[tuple[EmbedConfig, str], _Parsed]:
        """One upstream slot per distinct text of each configuration, but none for a vector kept from a round the
        store refused."""
        outcomes: dict[tuple[EmbedConfig, str], _Parsed] = {}
        by_config: dict[EmbedConfig, dict[str, None]] = {}
        for cfg, text in dict.fromkeys((cfg, text) for (cfg, _), text in wanted.items()):
            kept = self._paid.take(cfg, text)
            if kept is not None:
                outcomes[(cfg, text)] = kept
            else:
                by_config.setdefault(cfg, {})[text] = None
        configs = list(by_config)
        texts = [list(by_config[cfg]) for cfg in configs]
        results = await asyncio.gather(*(self._batcher.submit(cfg, t) for cfg, t in zip(configs, texts, strict=True)))
        for cfg, cfg_texts, cfg_outcomes in zip(configs, texts, results, strict=True):
            outcomes.update(((cfg, text), outcome) for text, outcome in zip(cfg_texts, cfg_outcomes, strict=True))
        return outcomes
