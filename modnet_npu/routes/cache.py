"""The cache of ATC's output: one folder per model, input shape, SoC and options, under ``models/.om-cache``.

A folder holds ``modnet.om``, ``atc.log`` (everything ATC printed, every
attempt) and ``meta.json`` (the command, how long it took, when). ``meta.json``
is written last, atomically: a folder without it is an unfinished or failed
compile and is never reused. Two runs compiling the same entry take turns (a
lock file), so the second one finds the first one's result.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from modnet_npu.fileio import write_json

OM_STEM = "modnet"


@dataclass(frozen=True)
class CacheEntry:
    folder: str

    @property
    def output(self) -> str:
        """What ATC's ``--output`` gets: ATC appends ``.om``."""
        return os.path.join(self.folder, OM_STEM)

    @property
    def log_path(self) -> str:
        return os.path.join(self.folder, "atc.log")

    @property
    def meta_path(self) -> str:
        return os.path.join(self.folder, "meta.json")

    def om_files(self) -> list[str]:
        """The .om files ATC wrote here (``modnet.om``; some toolkits add a platform suffix before ``.om``)."""
        try:
            names = sorted(n for n in os.listdir(self.folder) if n.startswith(OM_STEM) and n.endswith(".om"))
        except FileNotFoundError:
            return []
        return [os.path.join(self.folder, n) for n in names]

    def read_meta(self) -> dict[str, Any] | None:
        """The finished compile's record, or None (never compiled, failed, or its .om has gone)."""
        try:
            with open(self.meta_path) as fh:
                meta = json.load(fh)
        except (OSError, ValueError):
            return None
        return meta if os.path.isfile(os.path.join(self.folder, meta.get("om", ""))) else None

    def write_meta(self, meta: dict[str, Any]) -> None:
        write_json(self.meta_path, meta)

    def clear(self) -> None:
        """Remove a previous attempt's outputs (never the lock), so nothing stale looks finished."""
        for path in [self.meta_path, self.log_path, *self.om_files()]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def cache_key(*, model_sha256: str, input_name: str, shape: Sequence[int], soc_version: str,
              options: Sequence[str], atc: str) -> str:
    """What makes two compiles the same: the model's bytes, the input, the chip, ATC's options and ATC itself.

    ``atc`` is the resolved path of the executable: the toolkit's version folder
    is in it (``.../ascend-toolkit/8.0.RC2/...`` behind ``latest``), so an upgraded
    toolkit compiles afresh.
    """
    blob = json.dumps({"model_sha256": model_sha256, "input": input_name, "shape": list(shape),
                       "soc_version": soc_version, "options": list(options), "atc": atc}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def entry_for(cache_dir: str, *, soc_version: str, shape: Sequence[int], key: str) -> CacheEntry:
    """The entry's folder: readable (chip and size) and unique (the key)."""
    name = f"{soc_version}_{shape[-2]}x{shape[-1]}_{key[:16]}"
    return CacheEntry(os.path.join(cache_dir, name))


@contextlib.contextmanager
def locked(entry: CacheEntry) -> Iterator[None]:
    """Hold the entry's lock: one compile per entry at a time, across processes."""
    os.makedirs(entry.folder, exist_ok=True)
    with open(os.path.join(entry.folder, ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
