"""Servers in child processes on loopback: the harness of the service's tests and of the benchmarks.

:class:`ChildServer` is the one harness: a command in a child process, its
output in a log file, waited for until :meth:`ChildServer.ready` says so, and
always stopped (SIGTERM, then SIGKILL), also when start-up fails.
:class:`ServerProcess` is ``serve.py`` on it (its URL read from its log,
``/healthz``, resource limits); the peers suite's ``peers_rembg.Server`` is any
command on a port chosen beforehand (rembg's ``s``).

Kept out of the command line: ``serve.py`` is what users run; this is how tests
and ``benchmark.py serve`` run it.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Callable, Sequence

# the repository root, where serve.py lives (this file is modnet_npu/service/child.py)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POLL_S = 0.1  # how often start-up is checked


def http_status(url: str, timeout: float = 5.0) -> int:
    """The HTTP status a GET of ``url`` answers; 0 when nothing answers (not accepting yet)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:  # URLError (refused, reset) and timeouts
        return 0


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


class ChildServer:
    """``command`` in a child process, ready on enter (:meth:`ready` polled), always stopped on exit.

    Its output goes to ``log_path``; ``env`` is its whole environment (None:
    this process's); ``preexec_fn`` runs in the child before ``exec``;
    ``new_session`` puts it in a session of its own (a terminal's Ctrl-C does
    not reach it; :meth:`stop` still does). ``name`` is what messages call it.
    Start-up that fails raises RuntimeError (the command exited) or
    TimeoutError (not ready after ``start_timeout`` s), with its log's end.
    """

    def __init__(self, command: Sequence[str], *, log_path: str, name: str | None = None,
                 env: dict[str, str] | None = None, start_timeout: float = 180.0, stop_timeout: float = 20.0,
                 preexec_fn: Callable[[], None] | None = None, new_session: bool = False) -> None:
        self.command = list(command)
        self.log_path = log_path
        self.name = name or self.command[0]
        self.env = env
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.preexec_fn = preexec_fn
        self.new_session = new_session
        self.proc: subprocess.Popen | None = None

    def ready(self) -> bool:
        """Whether the server answers yet; polled every ``POLL_S`` s while it starts."""
        raise NotImplementedError

    def __enter__(self):
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, preexec_fn=self.preexec_fn, start_new_session=self.new_session)
        try:
            self._wait_ready(time.monotonic() + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def _log_tail(self) -> str:
        """The log's last 2000 characters on one line (a message's tail)."""
        return " ".join(self.log()[-2000:].split())

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}: {self._log_tail()}")
            if self.ready():
                return
            time.sleep(POLL_S)
        raise TimeoutError(f"{self.name} not ready after {self.start_timeout:g} s: {self._log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def memory(self) -> dict[str, float | None]:
        """Its resident and peak resident memory now, MB (:func:`memory_mb`)."""
        return memory_mb(self.proc.pid) if self.proc is not None else {"rss_mb": None, "peak_mb": None}

    def stop(self) -> int | None:
        """Stop the server (SIGTERM, SIGKILL after ``stop_timeout`` s); its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


_SERVING = re.compile(r"serving on (http://\S+?) ")


class ServerProcess(ChildServer):
    """``serve.py ARGS`` in a child process on a free loopback port, ready (``/healthz`` 200) on enter.

    ``serve.py --port 0`` picks the port and says it in its log (``serving on
    URL``), which is where :attr:`url` comes from. ``rlimits`` are set in the
    child before it starts (``{resource.RLIMIT_AS: (soft, hard)}``: a memory
    cap; ``RLIMIT_NOFILE``: a file-descriptor cap), ``env`` is added to its
    environment. Stopped on exit as every :class:`ChildServer`.
    """

    def __init__(self, args: Sequence[str], *, log_path: str, start_timeout: float = 180.0,
                 stop_timeout: float = 20.0, rlimits: dict[int, tuple[int, int]] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.rlimits = dict(rlimits or {})
        command = [sys.executable, os.path.join(ROOT, "serve.py"), "--host", "127.0.0.1", "--port", "0", *args]
        super().__init__(command, log_path=log_path, name="serve.py", start_timeout=start_timeout,
                         stop_timeout=stop_timeout, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
                         preexec_fn=self._limit if self.rlimits else None)
        self.url = ""

    def _limit(self) -> None:
        """In the child, before ``exec``: the resource limits asked for."""
        import resource

        for kind, limits in self.rlimits.items():
            resource.setrlimit(kind, limits)

    def ready(self) -> bool:
        if not self.url:
            found = _SERVING.search(self.log())
            self.url = found.group(1) if found else ""
            return False
        return http_status(self.url + "/healthz") == 200

    def rss_mb(self) -> float:
        """The server's resident memory now (Linux)."""
        rss = self.memory()["rss_mb"]
        if rss is None:
            raise RuntimeError("no VmRSS in /proc")
        return rss
