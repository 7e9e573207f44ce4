"""Small helpers the routes share: catching what native libraries print, and package versions."""
from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from importlib import metadata
from typing import Iterator


@contextlib.contextmanager
def captured_output() -> Iterator[list[str]]:
    """Everything printed meanwhile, by Python or by native code, as one text in the yielded list.

    ONNX Runtime reports a failed execution provider twice: its Python layer
    prints the fallback to ``sys.stdout`` and its C++ logger writes the reason to
    file descriptor 2. Both are caught here (and kept from the user's terminal),
    so the route can say why in one line of its own.
    """
    out: list[str] = []
    py = io.StringIO()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        saved = {fd: os.dup(fd) for fd in (1, 2)}
    except OSError:  # no standard descriptors (a detached process): Python's streams only
        saved = {}
    with tempfile.TemporaryFile(mode="w+b") as native:
        try:
            for fd in saved:
                os.dup2(native.fileno(), fd)
            with contextlib.redirect_stdout(py), contextlib.redirect_stderr(py):
                yield out
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            native.seek(0)
            out.append(py.getvalue() + native.read().decode("utf-8", "replace"))


def version_of(distribution: str) -> str | None:
    """The installed version of a distribution (as pip names it), None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
