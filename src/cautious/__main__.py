"""Command line: ``cautious demo``, ``verify``, ``compare``, ``build`` (and ``python -m cautious``)."""

from __future__ import annotations

import argparse
import sys


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    import cautious

    parser = argparse.ArgumentParser(prog="cautious", description="Cautious optimizers: spec, backends, conformance.")
    parser.add_argument("--version", action="version", version=f"cautious {cautious.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="step every base rule with and without caution on a toy problem")
    demo.add_argument("--steps", type=_positive_int, default=200, help="steps per optimizer (>= 1; default: 200)")
    verify = sub.add_parser("verify", help="check our backends or a third-party port against the reference")
    from cautious.conformance.verify import build_parser

    build_parser(verify)
    compare = sub.add_parser("compare", help="train the same MLP in every installed framework and compare")
    from cautious.compare import build_parser as compare_parser

    compare_parser(compare)
    research = sub.add_parser("research", help="train a small language model with and without caution, everywhere")
    from cautious.research import build_parser as research_parser

    research_parser(research)
    sub.add_parser("build", help="prebuild the native fused CPU kernel of cautious.torch (cached)")
    args, _ = parser.parse_known_args(argv)
    if args.command == "build":
        from cautious.torch import build_fused

        built = build_fused()
        for pair, ok in built.items():
            print(f"{pair}: {'native' if ok else 'not built (eager fallback)'}")
        return 0 if all(built.values()) else 1
    if args.command == "verify":
        from cautious.conformance.verify import main as verify_main

        return verify_main(sys.argv[2:] if argv is None else argv[1:])
    if args.command == "compare":
        from cautious.compare import main as compare_main

        return compare_main(sys.argv[2:] if argv is None else argv[1:])
    if args.command == "research":
        from cautious.research import main as research_main

        return research_main(sys.argv[2:] if argv is None else argv[1:])
    if args.command == "demo":
        from cautious._demo import main as demo_main

        return demo_main(args.steps)
    return 2


if __name__ == "__main__":
    sys.exit(main())
