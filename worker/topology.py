"""The broker objects every part agrees on, named once: the worker declares them, the client, the bench and the
tests publish to them. No aio-pika here, so anything may import it.

```
exchange embed.requests (direct) --embed.requests--> queue embed.requests  --dead letters--> embed.requests.dlx
                                 --embed.requests.bulk--> queue embed.requests.bulk --dead letters--> embed.requests.dlx
                                 --embed.deferred--> queue embed.deferred  --dead letters--> embed.requests.dlx
                                 --embed.deferred.flush--> each worker's embed.deferred.flush.<host>.<pid>.<rand>
exchange embed.requests.dlx (direct) --embed.requests--> embed.requests.dlq
                                     --embed.requests.bulk--> embed.requests.bulk.dlq
                                     --embed.deferred--> embed.deferred.dlq
```

``embed.requests`` and ``embed.requests.bulk`` are the two RPC lanes: the same requests, the same replies; every
worker serves both and gives the default lane's batches the upstream first (queries before ingestion). Bulk has a
dead-letter queue of its own so that what is replayed from it goes back to the bulk lane, not ahead of queries.
"""

from __future__ import annotations

from typing import Any

EXCHANGE = "embed.requests"
QUEUE = "embed.requests"
ROUTING_KEY = "embed.requests"
DLX = "embed.requests.dlx"
DLQ = "embed.requests.dlq"
BULK_QUEUE = "embed.requests.bulk"
BULK_KEY = "embed.requests.bulk"
BULK_DLQ = "embed.requests.bulk.dlq"
DEFERRED_QUEUE = "embed.deferred"
DEFERRED_KEY = "embed.deferred"
DEFERRED_DLQ = "embed.deferred.dlq"
FLUSH_KEY = "embed.deferred.flush"  # control messages: every worker's deferred lane drains now
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
DIRECT_REPLY_TO_PREFIX = DIRECT_REPLY_TO + "."  # what the broker turns DIRECT_REPLY_TO into: one name per channel

# Headers of the wire contract.
DEADLINE_HEADER = "x-deadline"  # Unix epoch milliseconds after which the caller no longer wants an answer
ERROR_HEADER = "x-embed-error"  # why the worker dead-lettered a message, in words
BATCH_ATTEMPTS_HEADER = "x-batch-attempts"  # deferred items sent back after failed Batch API jobs

# RabbitMQ 4.x caps a quorum queue consumer's prefetch at 2,000.
QUORUM_MAX_PREFETCH = 2000


def queue_arguments(queue_type: str, delivery_limit: int, dead_letter_key: str) -> dict[str, Any]:
    """Arguments of a work queue: dead letters to the DLX under ``dead_letter_key``; quorum delivery limit."""
    args: dict[str, Any] = {
        "x-queue-type": queue_type,
        "x-dead-letter-exchange": DLX,
        "x-dead-letter-routing-key": dead_letter_key,
    }
    if queue_type == "quorum":
        # Past this many deliveries the broker dead-letters the message (reason "delivery_limit"):
        # a request that crashes or stalls every worker cannot loop forever.
        args["x-delivery-limit"] = delivery_limit
    return args
