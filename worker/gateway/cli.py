"""``embed-worker gateway [--host H] [--port P]`` (and ``python -m worker.gateway``): settings, logging, the event
loop, and the exit code; the gateway itself is ``app.run_gateway``.

It starts and fails like the worker: a bad setting is one line on stderr and exit code 2 (as are a login or vhost the
broker refuses and a port it cannot listen on); a broker that does not answer within AMQP_CONNECT_TIMEOUT_S, 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from worker import logs
from worker.errors import StartupError

if TYPE_CHECKING:
    from worker.gateway.settings import GatewaySettings

PROG = "embed-worker gateway"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="address to listen on (default: GATEWAY_HOST, 0.0.0.0)")
    parser.add_argument("--port", type=int, default=None, help="port (default: GATEWAY_PORT, 8080; 0: any free one)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``embed-worker gateway``: for worker/cli.py's ``build_parser``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "gateway", help="serve OpenAI's /v1/embeddings and Gemini's embedding API over HTTP, through the workers"
    )
    add_arguments(parser)
    parser.set_defaults(func=lambda args: sys.exit(run(args)))
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the gateway until SIGTERM/SIGINT; the process's exit code."""
    from worker.cli import loop_factory
    from worker.gateway.app import run_gateway

    settings = _settings(args)
    logs.configure(settings.log_level, settings.log_format)
    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            runner.run(run_gateway(settings))
    except StartupError as exc:
        if os.environ.get("LOG_LEVEL", "").upper() == "DEBUG":
            logging.getLogger(__name__).exception("start-up failed")
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


def _settings(args: argparse.Namespace) -> GatewaySettings:
    """GatewaySettings, or exit 2 with the line (a few for several problems) that says what is wrong."""
    from worker.cli import load_settings
    from worker.gateway.settings import GatewaySettings

    overrides = {name: value for name, value in (("gateway_host", args.host), ("gateway_port", args.port)) if value}
    if args.port == 0:
        overrides["gateway_port"] = 0
    return load_settings(lambda: GatewaySettings(**overrides), PROG)
