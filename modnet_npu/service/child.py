"""``serve.py`` in a child process on a free loopback port: the harness of the service's tests and benchmark.

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
from typing import Sequence

# the repository root, where serve.py lives (this file is modnet_npu/service/child.py)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_SERVING = re.compile(r"serving on (http://\S+?) ")


class ServerProcess:
    """``serve.py ARGS`` in a child process on a free loopback port, ready (``/healthz`` 200) on enter.

    Always stopped on exit (SIGTERM, then SIGKILL after ``stop_timeout``), also
    when start-up fails; its output goes to ``log_path``. ``rlimits`` are set in
    the child before it starts (``{resource.RLIMIT_AS: (soft, hard)}``: a memory
    cap; ``RLIMIT_NOFILE``: a file-descriptor cap), ``env`` is added to its
    environment.
    """

    def __init__(self, args: Sequence[str], *, log_path: str, start_timeout: float = 180.0,
                 stop_timeout: float = 20.0, rlimits: dict[int, tuple[int, int]] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.rlimits = dict(rlimits or {})
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.health: list[int] = []  # the /healthz statuses seen while waiting

    def __enter__(self) -> "ServerProcess":
        script = os.path.join(ROOT, "serve.py")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, script, "--host", "127.0.0.1", "--port", "0", *self.args],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         preexec_fn=self._limit if self.rlimits else None)
        try:
            self._wait_ready(time.monotonic() + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _limit(self) -> None:
        """In the child, before ``exec``: the resource limits asked for."""
        import resource

        for kind, limits in self.rlimits.items():
            resource.setrlimit(kind, limits)

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as fh:
            return fh.read()

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve.py exited with status {self.proc.returncode}: {self.log()[-2000:]}")
            if not self.url:
                found = _SERVING.search(self.log())
                self.url = found.group(1) if found else ""
            elif self._health() == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"serve.py not ready after {self.start_timeout:g} s: {self.log()[-2000:]}")

    def _health(self) -> int:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=5) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError:
            status = 0  # not accepting yet
        self.health.append(status)
        return status

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_mb(self) -> float:
        """The server's resident memory now (Linux)."""
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        raise RuntimeError("no VmRSS in /proc")

    def stop(self) -> int | None:
        """Stop the server; its exit status."""
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


