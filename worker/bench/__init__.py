"""Benchmarks: load driver, reference workers and scenarios behind ``embed-worker bench``.

``harness`` (the emulator, vhosts, ``Bench.drain``, alternated rounds) and ``stats`` (ratios, medians with min-max)
serve the scenario modules: ``scenarios`` (and its ``SCENARIOS`` registry), ``quota``, ``lanes``; ``report`` writes
their JSON, plots and tables. Child processes are started with ``worker.processes``, which the end-to-end tests use
too. Like ``worker.client`` this is caller-side code and talks to RabbitMQ itself; nothing in the worker
imports it.
"""
