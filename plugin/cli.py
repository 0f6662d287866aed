"""The ``concept-exclusion`` command line.

Subcommands are registered through the ``concept_exclusion.commands`` entry-point group: each
entry point is a function ``register(subparsers)`` that adds one subparser and sets
``func=handler(args) -> int``. The core's commands (demo, audit, inspect) and the integrations'
(train) register the same way, so the core never imports an integration.

Exit codes: 0 success, 1 a check failed (e.g. audit found leakage), 2 unusable input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points

from ._version import __version__
from .errors import ConceptExclusionError

GROUP = "concept_exclusion.commands"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="concept-exclusion",
        description="Train diffusion models without learning prohibited concepts; check LoRA files for them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        try:
            register = ep.load()
        except ImportError as exc:  # an optional dependency of that command is missing
            logging.getLogger(__name__).debug("command %s unavailable: %s", ep.name, exc)
            continue
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ConceptExclusionError as exc:
        print(f"concept-exclusion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"concept-exclusion {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
