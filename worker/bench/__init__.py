"""Benchmarks: load driver, reference workers and scenarios behind ``embed-worker bench``.

Like ``worker.client`` this is caller-side code and talks to RabbitMQ itself; nothing in the worker
imports it.
"""
