from __future__ import annotations

import os
import stat

import pytest

from modnet_npu import fileio


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


def _aged(path, seconds_ago: float) -> None:
    import time

    path.write_bytes(b"x")
    t = time.time() - seconds_ago
    os.utime(path, (t, t))


def test_clean_stale_parts_removes_only_old_temporaries_of_our_shape(tmp_path):
    import time

    stale = tmp_path / ".x.abc123.part.png"
    fresh = tmp_path / ".y.def456.part.png"
    notes = tmp_path / ".notes.part"  # a user's file: not our shape, however old
    draft = tmp_path / "draft.part.png"
    for p in (stale, notes, draft):
        _aged(p, 7200)
    _aged(fresh, 0)
    sub = tmp_path / "sub"
    sub.mkdir()
    deep = sub / ".clip_matte.q1w2e3r4.part.mp4"
    _aged(deep, 7200)
    removed = fileio.clean_stale_parts(tmp_path, older_than=time.time() - 3600)
    assert removed == [str(stale)]
    assert fresh.exists() and notes.exists() and draft.exists() and deep.exists()
    assert fileio.clean_stale_parts(tmp_path, older_than=time.time() - 3600, recursive=True) == [str(deep)]
    assert fileio.clean_stale_parts(tmp_path / "absent", older_than=time.time()) == []


def test_clean_stale_parts_never_follows_or_removes_a_symlink(tmp_path):
    import time

    target = tmp_path / "precious.png"
    _aged(target, 7200)
    link = tmp_path / ".precious.abc123.part.png"
    link.symlink_to(target)
    os.utime(link, (0, 0), follow_symlinks=False)
    assert fileio.clean_stale_parts(tmp_path, older_than=time.time()) == []
    assert link.is_symlink() and target.exists()


def test_a_temporary_from_atomic_path_is_recognised(tmp_path):
    with fileio.atomic_path(tmp_path / "photo_matte.png") as tmp:
        assert fileio.is_temp_name(tmp)
    assert not fileio.is_temp_name("photo_matte.png")
