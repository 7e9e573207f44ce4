"""What the command lines share: the help formatter, and the one owner of error lines and exit statuses.

Every tool exits with the same status for the same kind of failure:

====  ==================================================================
0     done
1     the run failed (a missing or broken file, an absent device, …)
2     a bad option or option value (argparse's errors and ``UsageError``)
3     the run completed but its check failed (``run_npu_inference.py``: parity), report written
130   interrupted (Ctrl-C, SIGTERM, SIGHUP), outputs cleaned up
====  ==================================================================

and says what went wrong in one line starting ``error:`` on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
from typing import Any, Callable, Mapping, NoReturn, Sequence

from modnet_npu.errors import ModnetError, UsageError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CHECK_FAILED = 3  # not a bad option: the outputs are written and say what failed
EXIT_INTERRUPTED = 130
MAX_LINE = 1000  # an error line never carries more than this (a hostile value is cut, not echoed whole)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown as a user reads them: none where there is none to show, or where the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower():
            return text
        if isinstance(action.default, (tuple, list)):
            return f"{text} (default: {','.join(str(v) for v in action.default)})"
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with the shared help format and one-line usage errors (exit status 2)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        print(error_line(f"{message} (see {self.prog} --help)"), file=sys.stderr)
        sys.exit(EXIT_USAGE)


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """Text folded onto one line and cut to ``limit`` characters (the cut is marked)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def describe(exc: BaseException) -> str:
    """What an exception says to a user, one line: an OSError names its file and reason, not its errno."""
    if isinstance(exc, OSError) and not isinstance(exc, ModnetError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return one_line(f"{where}{exc.strerror}")
    if isinstance(exc, MemoryError):
        return "out of memory (try a smaller --batch, --max-side or --size)"
    return one_line(str(exc) or type(exc).__name__)


def error_line(message: str) -> str:
    return "error: " + one_line(message)


def report(exc: BaseException) -> int:
    """Print the one line for ``exc`` and return its exit status."""
    if isinstance(exc, KeyboardInterrupt):
        print("error: interrupted; no partial outputs were left", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(error_line(describe(exc)), file=sys.stderr)
    return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILED


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def interrupt_on_signals() -> None:
    """SIGTERM and SIGHUP end a run the way Ctrl-C does: clean-up runs, temporaries go, status 130."""
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            try:
                signal.signal(sig, _interrupt)
            except ValueError:  # not the main thread (an embedding application): leave its handlers alone
                return


def run_command(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int],
                argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run ``body(args)``; every user-facing failure becomes one line and its status."""
    args = parser.parse_args(argv)
    interrupt_on_signals()
    try:
        return body(args)
    except (ModnetError, OSError, ValueError, MemoryError, KeyboardInterrupt) as exc:
        return report(exc)


def lazy_exports(module_name: str, owners: Mapping[str, Sequence[str]]) -> tuple[Callable[[str], Any],
                                                                                Callable[[], list[str]]]:
    """A command-line face's ``__getattr__`` and ``__dir__`` (PEP 562): each name of ``owners[module]``
    imported from that module on first use, then kept in the face.

    The faces re-export the package's API, whose modules import torch or onnx (seconds): imported at the
    top, ``--help`` and a bad option would wait for them. ``__getattr__, __dir__ = lazy_exports(__name__,
    {...})`` keeps ``from face import name`` (and ``monkeypatch.setattr(face, name, ...)``) working.
    """
    module = sys.modules[module_name]
    owner_of = {name: owner for owner, names in owners.items() for name in names}

    def __getattr__(name: str) -> Any:
        owner = owner_of.get(name)
        if owner is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(owner), name)
        setattr(module, name, value)  # the next look-up is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(owner_of))

    return __getattr__, __dir__
