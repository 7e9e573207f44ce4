"""The root of the project's exceptions.

Every failure a user can cause (a missing or broken file, an absent device, a
download that cannot happen, a bad option value) raises a subclass of
:class:`ModnetError` defined beside the code that detects it, so callers tell
them apart by type and the command-line tools print any of them as one line.
"""
from __future__ import annotations


class ModnetError(Exception):
    """A failure with a message meant for the user, one line, naming what is wrong."""


class UsageError(ModnetError, ValueError):
    """A bad command-line option or option value: exit status 2 in every tool (``modnet_npu.cli``)."""
