"""Command line: ``cautious demo`` (and ``python -m cautious``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cautious", description="Cautious optimizers: spec, backends, conformance.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="step every base rule with and without caution on a toy problem")
    demo.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from cautious._demo import main as demo_main

        return demo_main(args.steps)
    return 2


if __name__ == "__main__":
    sys.exit(main())
