"""Command line: argument parsing and start-up only; the work lives in the modules it calls.

A start-up failure is one readable line naming the setting or the endpoint and the cause, and an exit code:
2 for a bad configuration (an invalid setting or argument, a login the broker refuses, a missing vhost, a port in
use), 1 when the broker did not answer within AMQP_CONNECT_TIMEOUT_S or a client command failed otherwise, 3 when
a client command's request had nobody to take it (the broker returned it: no worker, of the deferred lane for
`flush`, is listening on that vhost). The client commands take the same codes. The traceback is printed only with
LOG_LEVEL=DEBUG.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn, TypeVar

from worker import __version__, logs
from worker.errors import ConfigurationError, StartupError

NO_WORKER_EXIT = 3  # a client command's request was returned by the broker: no worker (of that lane) listens

if TYPE_CHECKING:
    from worker.settings import Settings


_S = TypeVar("_S")


def _settings() -> Settings:
    from worker.settings import Settings

    return load_settings(Settings)


def load_settings(build: Callable[[], _S], prog: str = "embed-worker") -> _S:
    """Settings built by ``build``, or exit 2 with one line (a few for several problems) that says what is wrong;
    the worker's and the gateway's (gateway/cli.py)."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    try:
        return build()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "_".join(str(p) for p in err["loc"]).upper()  # none: a check across settings, which names them
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{name}: {message}" if name else message)
        if len(problems) == 1:  # the usual case: one line
            _fail(f"{prog}: invalid settings: {problems[0]}", ConfigurationError.exit_code)
        _fail("\n  ".join([f"{prog}: invalid settings:", *problems]), ConfigurationError.exit_code)
    except SettingsError as exc:  # e.g. ALLOWED_MODELS that is not JSON: pydantic-settings fails before validating
        field = str(exc).split('"')[1] if '"' in str(exc) else "settings"
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        _fail(f"{prog}: invalid settings:\n  {field.upper()}: cannot be parsed{cause}", ConfigurationError.exit_code)


def _fail(message: str, code: int, exc: BaseException | None = None) -> NoReturn:
    """One readable line (or a few) and an exit code; the traceback only when LOG_LEVEL=DEBUG."""
    if exc is not None and os.environ.get("LOG_LEVEL", "").upper() == "DEBUG":
        import traceback

        traceback.print_exception(exc)
    print(message, file=sys.stderr)
    sys.exit(code)


def _broker_url(args: argparse.Namespace) -> str:
    """--url, else AMQP_URL, else the local default, checked as Settings checks AMQP_URL. Client commands need no
    full Settings (no Gemini key), nor pydantic: importing it would be a third of `embed`'s time."""
    source = "--url" if args.url else "AMQP_URL"
    url = str(args.url or os.environ.get("AMQP_URL") or logs.DEFAULT_AMQP_URL)
    try:
        logs.check_amqp_url(url)
    except ValueError as exc:
        _fail(f"embed-worker: {source}: {exc}", ConfigurationError.exit_code)
    return url


def _positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above zero (argparse exits 2 with the message otherwise)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _run(args: argparse.Namespace) -> None:
    # No cyclic GC while starting: the imports make ~130,000 long-lived objects, which the collector would walk
    # again and again for nothing (a collection then finds a few dozen cycles); measured, a fifth of the CPU of
    # importing. ``_tune_gc`` freezes them and turns it on again once the worker is ready.
    gc.disable()
    settings = _settings()  # validated once here, so a bad setting fails before any child starts
    logs.configure(settings.log_level, settings.log_format)
    if args.processes > 1:
        from worker.supervisor import Supervisor

        gc.enable()
        supervisor = Supervisor(args.processes, grace_s=settings.shutdown_grace_s, metrics_port=settings.metrics_port)
        sys.exit(supervisor.run())
    from worker import tracing
    from worker.app import run_worker

    async def serve() -> None:
        tracing.configure("embed-worker")  # on only with OTEL_EXPORTER_OTLP_ENDPOINT; each child of --processes
        ready = asyncio.Event()
        tuning = asyncio.create_task(_tune_gc_when(ready))
        try:
            await run_worker(settings, ready=ready)
        finally:
            tuning.cancel()
            tracing.shutdown()  # flushes the spans still batched

    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            runner.run(serve())
    except StartupError as exc:
        _fail(f"embed-worker: {exc}", exc.exit_code, exc)


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop unless EVENT_LOOP=asyncio (or uvloop is not installed, e.g. on Windows)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        logging.getLogger("worker").warning("uvloop is not installed here; running on asyncio's own event loop")
        return None
    return uvloop.new_event_loop


async def _tune_gc_when(ready: asyncio.Event) -> None:
    await ready.wait()  # everything a start imports is imported
    _tune_gc()


def _tune_gc() -> None:
    """Measured (README, Performance): the cyclic GC cost 67 µs per request at full load, a sixth of the worker's
    CPU, mostly re-walking the long-lived objects of the libraries we import. Freezing those (they live as long as
    the process) and collecting the youngest generation less often took it to 7 µs. Garbage is still collected:
    reference counting frees almost everything, and the batcher breaks its own cycles. No ``gc.collect()`` first:
    after start-up it found a few dozen objects and cost 50-100 ms, just when the first requests are in hand."""
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    gc.enable()


def _emulator(args: argparse.Namespace) -> None:
    from worker.emulator import Emulator, EmulatorState

    logs.configure("INFO")

    async def serve() -> None:
        state = EmulatorState(
            latency_ms=args.latency_ms, fail_rate=args.fail_rate, fail_status=args.fail_status, api_key=args.api_key
        )
        emulator = Emulator(state)
        port = await emulator.start(args.host, args.port)
        print(f"Gemini emulator listening on http://{args.host}:{port}", flush=True)
        await emulator.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


def _embed(args: argparse.Namespace) -> None:
    from worker.client import EmbedClientError, EmbedTimeout
    from worker.embed_file import embed_file, print_vectors

    url = _broker_url(args)
    options = {"model": args.model, "task_type": args.task_type, "output_dimensionality": args.dimensions}
    if not args.file and not args.texts:
        sys.exit("embed-worker embed: give texts, or --file")
    lane = args.lane or ("bulk" if args.file else "default")
    try:
        if args.file:
            count = asyncio.run(
                embed_file(
                    url,
                    args.file,
                    args.output,
                    options,
                    timeout=args.timeout,
                    chunk=args.chunk,
                    concurrency=args.concurrency,
                    lane=lane,
                )
            )
            print(f"{count} embeddings written to {args.output}", file=sys.stderr)
        else:
            asyncio.run(print_vectors(url, args.texts, options, timeout=args.timeout, as_json=args.json, lane=lane))
    except EmbedTimeout:
        _fail("embed-worker: no reply in time (is a worker running?)", 1)
    except EmbedClientError as exc:
        _fail(f"embed-worker: {_client_error(exc)}", _client_exit_code(exc), exc)


def _flush(args: argparse.Namespace) -> None:
    from worker.client import EmbedClient, EmbedClientError, EmbedTimeout

    url = _broker_url(args)

    async def call() -> int:
        async with EmbedClient(url, timeout=args.timeout) as client:
            return await client.flush()

    try:
        print(f"flushed: {asyncio.run(call())} vectors written")
    except EmbedTimeout:
        _fail("embed-worker: no worker answered the flush (is one running with REDIS_URL set?)", 1)
    except EmbedClientError as exc:
        _fail(f"embed-worker: {_client_error(exc)}", _client_exit_code(exc), exc)


def _client_error(exc: Exception) -> str:
    """The client's own failures name their cause; the worker's error replies are shown with their code."""
    from worker.client import EmbedClientError

    assert isinstance(exc, EmbedClientError)
    if exc.code in ("unreachable", "unroutable", "connection_lost", "malformed_reply"):
        return exc.message
    return f"error reply: {exc.code}: {exc.message}"


def _client_exit_code(exc: Exception) -> int:
    """2 when the broker refused us (login, vhost, TLS: as for `run`), 3 when it returned the request, else 1."""
    from worker.client import EmbedClientError, EmbedClientRefused

    if isinstance(exc, EmbedClientRefused):
        return ConfigurationError.exit_code
    if isinstance(exc, EmbedClientError) and exc.code == "unroutable":
        return NO_WORKER_EXIT
    return 1


def _bench(args: argparse.Namespace) -> None:
    from pathlib import Path

    from worker.bench.report import main as bench_main
    from worker.bench.scenarios import SCENARIOS, BenchConfig

    if args.scenario != "all" and args.scenario not in SCENARIOS:
        sys.exit(f"embed-worker bench: unknown scenario {args.scenario!r}; choose from {', '.join(SCENARIOS)} or all")
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    config = BenchConfig(
        amqp_url=_broker_url(args),
        requests=args.requests,
        batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        concurrency=args.concurrency,
        rates=args.rates,
        rate_seconds=args.rate_seconds,
        progress=not args.no_progress,
        prefetch=args.prefetch,
        repeat=args.repeat,
        worker_env=dict(item.split("=", 1) for item in args.set),
        **({"knee_emulator_config": json.loads(args.emulator_config)} if args.emulator_config else {}),
    )
    bench_main(names, config, Path(args.out), plot=not args.no_plot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embed-worker", description="Batching RabbitMQ worker for Gemini embeddings.")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a worker (settings from the environment / .env)")
    run.add_argument("--processes", type=int, default=1, help="worker processes under one supervising parent")
    run.set_defaults(func=_run)

    emu = sub.add_parser("emulator", help="run the Gemini-compatible emulator")
    emu.add_argument("--host", default="127.0.0.1")
    emu.add_argument("--port", type=int, default=8089)
    emu.add_argument("--latency-ms", type=float, default=0.0, help="added latency per call")
    emu.add_argument("--fail-rate", type=float, default=0.0, help="fraction of calls that fail")
    emu.add_argument("--fail-status", type=int, default=503, help="HTTP status of injected failures")
    emu.add_argument("--api-key", default=None, help="require this API key (default: any non-empty key)")
    emu.set_defaults(func=_emulator)

    emb = sub.add_parser("embed", help="send texts through RabbitMQ and print the vectors' heads")
    emb.add_argument("texts", nargs="*")
    emb.add_argument("--file", default=None, help="embed every non-empty line of this file")
    emb.add_argument("--output", default="embeddings.jsonl", help="with --file: .jsonl or .npy")
    emb.add_argument("--chunk", type=int, default=100, help="with --file: texts per request")
    emb.add_argument("--concurrency", type=int, default=8, help="with --file: requests in flight")
    emb.add_argument("--url", default=None, help="broker URL (default: AMQP_URL or the local broker)")
    emb.add_argument("--model", default=None)
    emb.add_argument("--task-type", default=None)
    emb.add_argument("--dimensions", type=int, default=None)
    emb.add_argument("--timeout", type=_positive_seconds, default=30.0, help="seconds to wait for the reply")
    emb.add_argument("--json", action="store_true", help="JSON lines output")
    emb.add_argument(
        "--lane",
        choices=["default", "bulk"],
        default=None,
        help="the RPC lane (default: bulk with --file, which is ingestion; default for texts, which are queries)",
    )
    emb.set_defaults(func=_embed)

    flush = sub.add_parser("flush", help="make every worker's deferred lane drain now, and wait for it")
    flush.add_argument("--url", default=None, help="broker URL (default: AMQP_URL or the local broker)")
    flush.add_argument("--timeout", type=_positive_seconds, default=300.0, help="seconds to wait for an answer")
    flush.set_defaults(func=_flush)

    from worker.gateway.cli import add_parser as add_gateway  # imports nothing heavy: `embed` stays fast

    add_gateway(sub)

    bench = sub.add_parser("bench", help="run a benchmark scenario against RabbitMQ and the emulator")
    bench.add_argument("scenario", help="a scenario of worker/bench/scenarios.py (SCENARIOS), or all")
    bench.add_argument("--url", default=None, help="broker URL (default: AMQP_URL or the local broker)")
    bench.add_argument("--requests", type=int, default=20_000, help="requests per drain run")
    bench.add_argument("--batch-size", type=int, default=None, help="worker BATCH_MAX_SIZE (default: its own)")
    bench.add_argument("--max-wait-ms", type=float, default=None, help="worker BATCH_MAX_WAIT_MS (default: its own)")
    bench.add_argument(
        "--concurrency", type=int, default=None, help="worker MAX_CONCURRENT_BATCHES, the adaptive limit's ceiling"
    )
    bench.add_argument(
        "--emulator-config",
        default=None,
        metavar="JSON",
        help='adaptive: the rising-latency run\'s /_emulator/config body (default {"capacity": 4}, 200 ms a call)',
    )
    bench.add_argument("--repeat", type=int, default=3, help="rounds of paired runs (ratios: median of rounds)")
    bench.add_argument("--prefetch", type=int, default=None, help="worker PREFETCH_COUNT (default: its own)")
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra worker setting")
    bench.add_argument("--rates", type=float, nargs="+", default=[5, 50, 200, 500, 1000, 2000])
    bench.add_argument("--rate-seconds", type=float, default=3.0, help="seconds of load per latency rate")
    bench.add_argument("--out", default="bench-results", help="folder for JSON results and PNG plots")
    bench.add_argument("--no-progress", action="store_true")
    bench.add_argument("--no-plot", action="store_true")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.captureWarnings(True)
    args.func(args)
