"""What the command-line front ends share."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown as a user reads them: none where there is none to show, or where the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower():
            return text
        if isinstance(action.default, (tuple, list)):
            return f"{text} (default: {','.join(str(v) for v in action.default)})"
        return super()._get_help_string(action)
