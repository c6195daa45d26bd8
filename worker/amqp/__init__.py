"""The worker's RabbitMQ adapters: the only worker modules that import aio-pika, aiormq or pamqp.

Split by job: ``connection`` (connect, TLS, topology), ``rpc`` (the RPC consumer, reply publishing, caller
probe), ``deferred`` (the deferred queue and flush listener), ``settle`` (the one place that acks, rejects and
dead-letters), ``delivery`` (a message as the core sees it), ``publish`` (confirmed publishing) and ``codec``
(tolerant decoding of AMQP short strings). Outside the worker, ``client.py`` and ``bench/`` use aio-pika too,
as callers do.
"""
