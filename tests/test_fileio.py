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


@pytest.mark.parametrize("name", ["a" * 236 + ".png", "b" * 251 + ".png", "é" * 120 + "xy.png", "c" * 255])
def test_the_temporary_of_a_long_name_fits_where_the_name_does(tmp_path, name):
    dest = tmp_path / name
    with fileio.atomic_path(dest) as tmp:
        tmp_name = os.path.basename(tmp)
        assert len(os.fsencode(tmp_name)) <= 255 and fileio.is_temp_name(tmp_name)
        assert tmp_name.endswith(".part" + os.path.splitext(name)[1])  # the real extension stays last
        prefix, suffix = fileio.temp_affixes(dest)
        assert tmp_name.startswith(prefix) and tmp_name.endswith(suffix)  # what a clean-up looks for
        with open(tmp, "wb") as fh:
            fh.write(b"data")
    assert os.listdir(tmp_path) == [name] and dest.read_bytes() == b"data"


def test_short_names_keep_their_whole_base_in_the_temporary(tmp_path):
    assert fileio.temp_affixes(tmp_path / "photo_matte.png") == (".photo_matte.", ".part.png")


@pytest.mark.parametrize("target,expect", [
    ("file", "--output-dir {file}: is a file, not a folder"),
    ("file/sub", "--output-dir {file}/sub: {file} is a file, not a folder"),
    ("/dev/null", "--output-dir /dev/null: is not a folder"),
    ("/proc", "--output-dir /proc: cannot create files there"),
    ("/proc/new/folder", "--output-dir /proc/new/folder: cannot create files there (/proc)"),
])
def test_an_output_folder_that_cannot_take_files_is_a_usage_error(tmp_path, target, expect):
    from modnet_npu.errors import UsageError

    file = tmp_path / "taken.png"
    file.write_bytes(b"keep me")
    if target.startswith("file"):
        target = target.replace("file", str(file))
    elif not os.path.exists(target.split("/new")[0]):
        pytest.skip(f"{target} does not exist here")
    with pytest.raises(UsageError) as info:
        fileio.check_output_folder(target)
    assert str(info.value).startswith(expect.format(file=file))
    assert file.read_bytes() == b"keep me" and os.listdir(tmp_path) == ["taken.png"]


def test_a_writable_or_not_yet_made_output_folder_passes_and_nothing_is_left(tmp_path):
    fileio.check_output_folder(tmp_path)
    fileio.check_output_folder(tmp_path / "new" / "deeper")  # not made: its nearest parent takes files
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root writes anywhere")
def test_a_read_only_folder_is_refused(tmp_path):
    from modnet_npu.errors import UsageError

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(UsageError, match="cannot create files there"):
            fileio.check_output_folder(ro / "out", option="-o")
    finally:
        ro.chmod(0o755)


def test_read_capped_stops_after_the_limit():
    import io

    assert fileio.read_capped(io.BytesIO(b"x" * 10), 10, "stdin") == b"x" * 10

    class Endless(io.RawIOBase):
        read_bytes = 0

        def read(self, n=-1):
            assert n is not None and 0 < n <= 1 << 20  # never "everything"
            Endless.read_bytes += n
            return b"\0" * n

    with pytest.raises(fileio.InputTooLargeError, match=r"^stdin: more than 3000000 bytes; not read further$"):
        fileio.read_capped(Endless(), 3_000_000, "stdin")
    assert Endless.read_bytes <= 3_000_001
