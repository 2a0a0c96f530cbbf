"""Entry point: ``sparsealloc COMMAND ...``; ``main(argv) -> exit code``.

Exit codes: 0 success, 2 bad input (one line on stderr saying what was expected and what was
received, no traceback), 1 runtime failure, 130 Ctrl-C, 141 stdout closed early (``| head``).
``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence

from sparsealloc.core.errors import SparseAllocError, SpecError

#: What ``sparsealloc --help`` says first.
DESCRIPTION = ("Prune a language model, or search how sparse each of its layers should be for a total "
               "sparsity budget (Optuna studies), then export, apply and evaluate the best allocation.")
EPILOG = "Run 'sparsealloc COMMAND --help' for a command's options; 'sparsealloc doctor' checks the setup."

COMMAND_MODULES = ("prune", "apply", "evaluate", "study", "export", "report", "dashboard", "calib", "generate", "doctor")


class UsageError(SpecError):
    """argparse rejected the command line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message, exit 2 via main
        raise UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The full command-line parser (sub-commands register themselves)."""
    import importlib

    parser = _Parser(prog="sparsealloc", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--log-format", choices=("bar", "json"), default="bar",
                        help="progress as bars (default; one plain line per step when stderr is not a terminal) "
                             "or JSON lines on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"sparsealloc.cli.{name}").register(sub)
    return parser


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    argv = _globals_first(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    from sparsealloc.core import progress

    # Bars only on a terminal: piped or logged stderr gets one line per step, no cursor codes.
    bar = "bar" if _is_terminal(sys.stderr) else "plain"
    progress.set_mode("quiet" if args.quiet else ("json" if args.log_format == "json" else bar))
    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(message)s")
    _quiet_libraries(args.debug)
    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # a reader that left (| head) shows here, not as a traceback at exit
        return code
    except SparseAllocError as exc:
        if debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # search.study.run's Interrupted says how to resume
        print(f"error: {_one_line(exc) or 'interrupted'}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _drop_stdout()
        return 141  # 128 + SIGPIPE, as the shell reports a command killed by a closed pipe


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail on the closed pipe."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # stdout is not a file (tests' StringIO)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _globals_first(argv: list[str]) -> list[str]:
    """Accept the global options anywhere (``sparsealloc study run ... --quiet``) by moving them first."""
    front, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--quiet", "--debug") or arg.startswith("--log-format="):
            front.append(arg)
        elif arg == "--log-format" and i + 1 < len(argv):
            front += argv[i : i + 2]
            i += 1
        else:
            rest.append(arg)
        i += 1
    return front + rest


def _quiet_libraries(debug: bool) -> None:
    """Optuna logs every study creation and experimental API at INFO/warning level; keep the CLI clean."""
    import warnings

    if not debug:
        warnings.filterwarnings("ignore", message=r".*is experimental.*")
        # Heartbeats are recorded under ask/tell on purpose (storage/coordination.py).
        warnings.filterwarnings("ignore", message=r"Heartbeat of storage is supposed to be used with Study\.optimize")
        # huggingface_hub logs each failed download attempt; the error itself is reported on one line.
        # (The variable counts when the library configures its logger later; the level when it has.)
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
        with contextlib.suppress(ImportError):
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
