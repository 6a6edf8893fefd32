"""Entry point of the ``memtrain`` command.

Each sub-command lives in its own module under ``memtrain.cli`` and exposes
``register(subparsers) -> None``; it sets ``func`` on its parser, which receives the parsed args and
returns an exit code. User errors (:class:`memtrain.errors.UserError`: bad config, data, path or flag,
missing asset), a server that fails (generation engine, retriever), a missing file and OS errors (read-only
or full disk, permission denied, port in use, bad host) are printed as one clear line that keeps the real
cause, never as a traceback; any other exception - a plain ValueError included - is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import socket
import sys

from memtrain import __version__
from memtrain.errors import UserError
from memtrain.log import setup_logging
from memtrain.plugins import load_plugins

COMMAND_MODULES = [
    "memtrain.cli.assets",
    "memtrain.cli.train",
    "memtrain.cli.plot",
    "memtrain.cli.answer",
    "memtrain.cli.data",
    "memtrain.cli.eval",
    "memtrain.cli.report",
    "memtrain.cli.serve_retriever",
]


def _user_errors() -> tuple[type[BaseException], ...]:
    """What is printed as one line besides OS errors: the user's mistakes and the servers' failures."""
    from memtrain.engines.openai import EngineError
    from memtrain.retrieval.service import RetrieverError

    return (UserError, EngineError, RetrieverError, FileNotFoundError)


def os_error_line(exc: OSError) -> str:
    """One line for an OS error that keeps its real cause: reason, errno name and the path(s) or host.

    ``socket.gaierror`` (bad host) carries no host of its own; commands that bind or connect name it.
    """
    reason = exc.strerror or str(exc) or type(exc).__name__
    code = errno.errorcode.get(exc.errno, "") if isinstance(exc.errno, int) else ""
    if isinstance(exc, socket.gaierror):
        code = "host lookup failed"
    where = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    return f"{where + ': ' if where else ''}{reason}{f' ({code})' if code else ''}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memtrain",
        description="Train the memory of LLM agents without labels (MemTrain).",
    )
    parser.add_argument("--version", action="version", version=f"memtrain {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        load_plugins()  # before the parser: a plug-in's evaluations are sub-commands
    except UserError as exc:
        print(f"memtrain: error: {exc}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        setup_logging(args.log_level)
    except UserError as exc:  # a bad --log-level: a usage error like any other flag's
        parser.error(str(exc))
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        if args.log_level.upper() == "DEBUG":
            raise
        print(f"memtrain {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `memtrain data show DIR | head`
        sys.stderr.close()
        return 0
    except OSError as exc:  # read-only or full disk, permission denied, port in use, bad host: not our bug
        if args.log_level.upper() == "DEBUG":
            raise
        print(f"memtrain {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"memtrain {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
