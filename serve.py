"""Matting over HTTP: ``python3 serve.py [--host 127.0.0.1] [--port 7000] [engine options]``.

A web page at ``/``, the API under ``/api`` (``/api/matte``, rembg's
``/api/remove``, ``/api/info``), ``/healthz`` for load balancers; concurrent
requests whose images share a model input size are inferred as one batch. The
app itself is ``service.py``; this file is its command line: options, process
set-up, the listening socket and uvicorn.
"""
from __future__ import annotations

if __name__ == "__main__":  # as a command, not imported: bound OpenMP's spinning before torch loads
    from modnet_npu.runtime.process_setup import configure_openmp

    configure_openmp()

import argparse
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from typing import Sequence

from modnet_npu.cli import Parser, report
from modnet_npu.errors import UsageError
from modnet_npu.runtime.options import EngineOptions, add_engine_arguments, engine_options_from


def _number(kind: type, low: float, *, above: bool = False):
    """An argparse type: ``kind`` at least ``low`` (above it with ``above``), so bad values end before any import."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < low or (above and value == low):
            raise argparse.ArgumentTypeError(f"must be {'above' if above else 'at least'} {low:g}, got {text}")
        return value

    return parse


def _megabytes(text: str) -> int:
    return int(_number(float, 0, above=True)(text) * 1_000_000)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="MODNet portrait matting over HTTP: a web page and an API "
                           "(rembg-compatible routes included), batched across requests.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_number(int, 0), default=7000, help="port (0: any free one, printed at start)")
    add_engine_arguments(p, title="engine (as inference.py)", help={
        "allow_synthetic": "when the default model cannot be downloaded, use a generated one (meaningless mattes; "
                           "for testing; /api/info and the page say so)",
        "size": "model input: auto (MODNet's rule), N (short side) or HxW; a request's size parameter overrides it",
    })
    s = p.add_argument_group("batching and limits")
    s.add_argument("--batch-window-ms", type=_number(float, 0), default=5.0,
                   help="how long a request waits for others of its model input size (0: no waiting)")
    s.add_argument("--max-batch", type=_number(int, 1), default=8, help="most images in one forward (1: batching off)")
    s.add_argument("--max-bytes", type=_megabytes, default="20", metavar="MB",
                   help="largest request body or fetched URL, in MB (decimal)")
    s.add_argument("--max-pixels", type=_number(float, 0, above=True), default=40.0, metavar="MP",
                   help="largest image, in megapixels (larger: 413, before decoding)")
    s.add_argument("--max-queue", type=_number(int, 1), default=64, help="requests in the service at once; more get 503")
    s.add_argument("--timeout", type=_number(float, 0, above=True), default=60.0, help="seconds a request may wait for its matte (504)")
    s.add_argument("--url-timeout", type=_number(float, 0, above=True), default=10.0, help="seconds to fetch a url= image")
    s.add_argument("--allow-private-urls", action="store_true",
                   help="let url= reach loopback, private, link-local and reserved addresses")
    s.add_argument("--io-threads", type=_number(int, 1), default=4, help="threads decoding and encoding images")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    return p


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts, so that ``--port 0`` can say which port it got."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _open_matter(opts: EngineOptions):
    from modnet_npu.matting.matter import Matter

    return Matter(opts, log=logging.getLogger("modnet.serve").info)


def _settings(args: argparse.Namespace):
    from modnet_npu.service.app import ServiceSettings

    return ServiceSettings(batch_window_ms=args.batch_window_ms, max_batch=args.max_batch, max_bytes=args.max_bytes,
                           max_pixels=int(args.max_pixels * 1_000_000), max_queue=args.max_queue,
                           timeout_s=args.timeout, fetch_timeout_s=args.url_timeout,
                           allow_private_urls=args.allow_private_urls, io_threads=args.io_threads)


def _serve(args: argparse.Namespace, opts: EngineOptions, sock: socket.socket) -> int:
    import uvicorn

    from modnet_npu.service.app import create_app

    failed: list[str] = []
    server: uvicorn.Server | None = None

    def fatal(message: str) -> None:
        failed.append(message)
        if server is not None:
            server.should_exit = True  # uvicorn polls it; the lifespan then closes the service

    app = create_app(_settings(args), lambda: _open_matter(opts), on_fatal=fatal)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=10, lifespan="on")
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving on http://{shown}:{port} (the model loads now; /healthz answers 200 once it is ready)",
          file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, bind, serve; a failure before serving is one ``error:`` line and the shared exit status
    (``modnet_npu.cli``). No SIGTERM handler of ours: uvicorn shuts down on it and the process then
    dies of the signal, as a service should."""
    args = build_parser().parse_args(argv)  # numbers out of range end here, before anything is imported
    try:
        opts = engine_options_from(args)  # every engine option checked before the port is taken
        sock = _bind(args.host, args.port)  # a port in use is reported before the slow start
    except (UsageError, OSError) as exc:
        return report(exc)
    try:
        return _start(args, opts, sock)
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
        return 130
    except (UsageError, OSError) as exc:
        return report(exc)
    finally:
        sock.close()


def _start(args: argparse.Namespace, opts: EngineOptions, sock: socket.socket) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s", stream=sys.stderr)
    from modnet_npu.runtime.process_setup import setup_process

    # once, before the model is built: threads, allocator, PIL's own pixel limit (ours is checked first)
    proc = setup_process(threads=opts.threads, compile_cache_dir=os.path.join(opts.models_dir, ".compile-cache"),
                         max_image_pixels=int(args.max_pixels * 1_000_000))
    try:
        _settings(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return _serve(args, replace(opts, threads=proc.threads), sock)


# --------------------------------------------------------------------------
# a server in a child process, for tests and benchmarks
# --------------------------------------------------------------------------

_SERVING = re.compile(r"serving on (http://\S+?) ")


class ServerProcess:
    """``serve.py ARGS`` in a child process on a free loopback port, ready (``/healthz`` 200) on enter.

    Always stopped on exit (SIGTERM, then SIGKILL after ``stop_timeout``), also
    when start-up fails; its output goes to ``log_path``.
    """

    def __init__(self, args: Sequence[str], *, log_path: str, start_timeout: float = 180.0,
                 stop_timeout: float = 20.0) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.health: list[int] = []  # the /healthz statuses seen while waiting

    def __enter__(self) -> "ServerProcess":
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, script, "--host", "127.0.0.1", "--port", "0", *self.args],
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
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


if __name__ == "__main__":
    sys.exit(main())
