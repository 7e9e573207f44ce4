"""The help every command prints: defaults as a user reads them."""
from __future__ import annotations

import contextlib
import io
import re

import pytest

import benchmark
import inference
import run_npu_inference
import serve


def _help(module) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        module.main(["--help"])
    return " ".join(out.getvalue().split())


@pytest.mark.parametrize("module", [run_npu_inference, inference, serve, benchmark])
def test_help_has_no_empty_or_doubled_defaults(module):
    text = _help(module)
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: (" not in text
    assert not re.search(r"default[^()]*\)\s*\(default", text), "a default said twice"


def test_tuple_defaults_are_written_as_typed():
    assert "(default: 1,8)" in _help(run_npu_inference)
