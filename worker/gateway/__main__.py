"""``python -m worker.gateway [--host H] [--port P]``: the same as ``embed-worker gateway``."""

from __future__ import annotations

import argparse
import sys

from worker.gateway.cli import PROG, add_arguments, run


def main() -> None:
    parser = argparse.ArgumentParser(prog=PROG, description="The HTTP gateway: OpenAI and Gemini embedding APIs.")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
