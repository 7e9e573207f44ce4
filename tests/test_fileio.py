from __future__ import annotations

import os
import stat

import pytest

import fileio


def test_atomic_path_replaces_only_on_success(tmp_path):
    dest = tmp_path / "sub" / "report.json"
    fileio.write_json(dest, {"a": 1})
    assert dest.read_text().strip().startswith("{")
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(dest) as tmp:
            with open(tmp, "w") as fh:
                fh.write("half-writ")
            raise RuntimeError("interrupted")
    assert '"a": 1' in dest.read_text()  # the old file is intact
    assert sorted(os.listdir(dest.parent)) == ["report.json"]  # no temporary left


def test_written_files_get_normal_permissions(tmp_path):
    dest = tmp_path / "x.bin"
    fileio.write_bytes(dest, b"data")
    mode = stat.S_IMODE(os.stat(dest).st_mode)
    mask = os.umask(0)
    os.umask(mask)
    assert mode == 0o666 & ~mask


def test_temporary_keeps_the_extension(tmp_path):
    with fileio.atomic_path(tmp_path / "model.onnx") as tmp:
        assert tmp.endswith(".onnx") and os.path.dirname(tmp) == str(tmp_path)
        open(tmp, "wb").close()
