"""One synchronous round of the deferred lane: messages in, vectors written, a ``Settle`` per message out.

| outcome for a message                                               | settle                                   |
|---------------------------------------------------------------------|------------------------------------------|
| not a valid request                                                 | dead-letter                              |
| every item written, unchanged, or superseded by a written text      | ack                                      |
| some items refused (the API rejects the text, the key holds another | those items split off into the DLQ with  |
|   type, the key is in the worker's reserved namespace); rest done   |   their reason (``x-embed-error``); ack  |
| every item refused                                                  | dead-letter with the reason              |
| an item's upstream call failed after its retry budget               | requeue (the delivery limit parks it)    |
| Redis unavailable                                                   | requeue the whole round; the lane pauses |

Savings: within a round a key is embedded once (its latest text wins), identical texts of one configuration
share one upstream slot, and (``DEFERRED_SKIP_UNCHANGED``) keys whose hash already holds an embedding of the
same text, model and dimension are skipped. If the API rejects a key's latest text, the key falls back to its
latest earlier text of the round: a good text superseded by a bad one is still written, never silently lost.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from worker.batcher import Batcher
from worker.errors import EmbedError, InvalidRequest
from worker.inputs import EmbedInput
from worker.logs import safe
from worker.messages import DeferredRequest, EmbedConfig, RequestLimits, decode_deferred, encode_deferred_items
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
from worker.service import BatchingConfig
from worker.upstream import Outcome

log = logging.getLogger(__name__)

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
    """One key of a round: its texts in arrival order, and what became of it."""

    candidates: list[str] = field(default_factory=list)  # distinct texts, oldest first; the last one is wanted
    existing: Existing = field(default_factory=Existing)
    settled_text: str | None = None  # the text whose vector the key holds or will hold (written, unchanged, in a job)
    refused: str | None = None  # why the key takes no vector at all
    transient: bool = False  # the wanted text failed upstream, but may succeed another time


def text_hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def decode_round(deliveries: Sequence[Delivery], limits: RequestLimits) -> tuple[Decoded, RoundResult]:
    """The valid requests, and a result that already dead-letters the invalid ones."""
    decoded: Decoded = []
    result = RoundResult()
    for delivery in deliveries:
        try:
            request = decode_deferred(
                delivery.body,
                content_type=delivery.content_type,
                content_encoding=delivery.content_encoding,
                limits_=limits,
            )
        except InvalidRequest as exc:
            log.warning("invalid deferred request (message_id=%s): %s", safe(delivery.message_id), safe(exc.message))
            result.settles.append((delivery, dead_letter("invalid_request", f"invalid_request: {exc.message}")))
            continue
        decoded.append((delivery, request))
    return decoded, result


async def key_states(store: VectorStore, decoded: Decoded, reserved_prefix: str) -> dict[KeyId, KeyState]:
    """Every key of the round, its texts, what Redis holds for it, and whether it can take a vector at all."""
    keys: dict[KeyId, KeyState] = {}
    for _, request in decoded:
        for key, text in zip(request.keys, request.texts, strict=True):
            state = keys.setdefault((request.config, key), KeyState())
            if text in state.candidates:
                state.candidates.remove(text)
            state.candidates.append(text)
    for (_, key), state in keys.items():
        if reserved_prefix and key.startswith(reserved_prefix):
            # The worker keeps its own state under this prefix (Batch API jobs, the cache, rate limits).
            state.refused = f"key {key[:100]!r} is in the worker's reserved namespace {reserved_prefix!r}"
    open_keys = [kid for kid, state in keys.items() if state.refused is None]
    for kid, have in zip(open_keys, await store.existing([key for _, key in open_keys]), strict=True):
        keys[kid].existing = have
        keys[kid].refused = have.error
    return keys


def unchanged(state: KeyState, text: str, config: EmbedConfig) -> bool:
    have = state.existing
    return have.text_hash == text_hash(text) and have.model == config.model and have.dimensions == config.dimensions


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
    cfg = request.config
    body = encode_deferred_items(
        [(k, t) for k, t, _ in failed],
        model=cfg.model,
        task_type=cfg.task_type,
        output_dimensionality=cfg.output_dimensionality,
    )
    return ACK, (body, reason)


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
        budgets: BatchingConfig | None = None,
    ):
        self._store = store
        self._upstream = upstream
        self._skip_unchanged = skip_unchanged
        self._reserved_prefix = reserved_prefix
        self._batcher: Batcher[EmbedConfig, EmbedInput, Outcome] = Batcher(
            self._embed_batch,
            max_size=batch_max_size,
            max_wait=0,
            max_concurrent=max_concurrent,
            weigh=budgets.weighing if budgets is not None else None,
            budgets=budgets.budgets if budgets is not None else (),
        )

    async def _embed_batch(self, config: EmbedConfig, texts: list[EmbedInput]) -> list[Outcome]:
        return await self._upstream.embed(texts, config)

    async def run(self, decoded: Decoded) -> RoundResult:
        result = RoundResult()
        if not decoded:
            return result
        rejected: dict[tuple[EmbedConfig, str], EmbedError] = {}
        try:
            keys = await key_states(self._store, decoded, self._reserved_prefix)
            entries = await self._embed_keys(keys, rejected)
            errors = await self._store.write([entry for _, entry in entries]) if entries else []
        except StoreUnavailable as exc:
            result.settles = [(delivery, REQUEUE) for delivery, _ in decoded]
            result.store_error = exc
            return result
        for (kid, _), error in zip(entries, errors, strict=True):
            if error is None:
                keys[kid].settled_text = keys[kid].candidates[-1]
                result.written += 1
            else:
                keys[kid].refused = error
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

    async def _embed_keys(
        self, keys: dict[KeyId, KeyState], rejected: dict[tuple[EmbedConfig, str], EmbedError]
    ) -> list[tuple[KeyId, StoredVector]]:
        """Embed each key's wanted text; a text the API rejects makes its key fall back to its previous one."""
        entries: list[tuple[KeyId, StoredVector]] = []
        todo = [kid for kid, state in keys.items() if state.refused is None]
        while todo:
            wanted: dict[KeyId, str] = {}
            for kid in todo:
                state, text = keys[kid], keys[kid].candidates[-1]
                if self._skip_unchanged and unchanged(state, text, kid[0]):
                    state.settled_text = text
                else:
                    wanted[kid] = text
            outcomes = await self._embed(wanted)
            todo = []
            for kid, text in wanted.items():
                outcome = outcomes[(kid[0], text)]
                state = keys[kid]
                if not isinstance(outcome, EmbedError):
                    entries.append((kid, StoredVector(kid[1], outcome, kid[0].model, text_hash(text))))
                elif outcome.replayable:
                    state.transient = True
                else:
                    rejected[(kid[0], text)] = outcome
                    state.candidates.pop()
                    if state.candidates:
                        todo.append(kid)
        return entries

    async def _embed(self, wanted: dict[KeyId, str]) -> dict[tuple[EmbedConfig, str], Outcome]:
        """One upstream slot per distinct text of each configuration."""
        by_config: dict[EmbedConfig, dict[str, None]] = {}
        for (cfg, _), text in wanted.items():
            by_config.setdefault(cfg, {})[text] = None
        configs = list(by_config)
        texts = [list(by_config[cfg]) for cfg in configs]
        results = await asyncio.gather(*(self._batcher.submit(cfg, t) for cfg, t in zip(configs, texts, strict=True)))
        return {
            (cfg, text): outcome
            for cfg, cfg_texts, outcomes in zip(configs, texts, results, strict=True)
            for text, outcome in zip(cfg_texts, outcomes, strict=True)
        }
