"""The ``concept-exclusion`` command line.

Subcommands are registered through the ``concept_exclusion.commands`` entry-point group: each
entry point is a function ``register(subparsers)`` that adds one subparser and sets
``func=handler(args) -> int``. The core's commands (demo, audit, inspect) and the integrations'
(train) register the same way, so the core never imports an integration.

Exit codes: 0 success, 1 a check failed (audit: FLAGGED), 2 unusable input (one line on stderr),
3 audit UNVERIFIED, 4 internal error (one line, never a traceback; ``-v`` logs it), 5 audit
PASS-APPROXIMATE, 130 interrupted, 141 the output pipe was closed (``| head``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import entry_points

from concept_exclusion._version import __version__
from concept_exclusion.errors import ConceptExclusionError

EXIT_UNUSABLE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 2, 4, 130, 141

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
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except ConceptExclusionError as exc:
        _error(args.command, f"error: {exc}")
        return EXIT_UNUSABLE
    except KeyboardInterrupt:
        _error(args.command, "interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as exc:  # noqa: BLE001 - an internal fault: one line, its own exit code
        logging.getLogger(__name__).info("internal error", exc_info=True)
        _error(args.command, f"internal error ({type(exc).__name__}: {str(exc)[:200]}); rerun with -v to log it")
        return EXIT_INTERNAL


def _error(command: str, message: str) -> None:
    """One sanitised line on stderr (messages may quote file contents: names, metadata)."""
    from concept_exclusion.audit.format import clean

    try:
        print(f"concept-exclusion {command}: {clean(message, 1000)}", file=sys.stderr)
    except (BrokenPipeError, OSError):
        _silence_stdout()


def _silence_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so that the interpreter's final flush cannot fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        return


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
