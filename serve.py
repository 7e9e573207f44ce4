"""Matting over HTTP: ``python3 serve.py [--host 127.0.0.1] [--port 7000] [engine options]``.

A web page at ``/``, the API under ``/api`` (``/api/matte``, rembg's
``/api/remove``, ``/api/info``), ``/healthz`` for load balancers; concurrent
requests whose images share a model input size are inferred as one batch. The
app itself is ``modnet_npu/service/``; this file is its command line: options, process
set-up, the listening socket and uvicorn.
"""
from __future__ import annotations

if __name__ == "__main__":  # as a command, not imported: bound OpenMP's spinning before torch loads
    from modnet_npu.runtime.process_setup import configure_openmp

    configure_openmp()

import argparse
import logging
import socket
import sys
from dataclasses import replace
from typing import Sequence

from modnet_npu.cli import Parser, report
from modnet_npu.errors import ModnetError, UsageError
from modnet_npu.source.resolve import check_local
from modnet_npu.runtime.options import EngineOptions, compile_cache_dir, add_engine_arguments, engine_options_from


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
    s.add_argument("--max-model-pixels", type=_number(float, 0, above=True), default=2.1, metavar="MP",
                   help="largest model input of a request, in megapixels (larger size=: 422); also the most "
                        "model input pixels in one batch, which bounds a forward pass's memory")
    s.add_argument("--max-queue", type=_number(int, 1), default=64, help="requests in the service at once; more get 503")
    s.add_argument("--max-queue-pixels", type=_number(float, 0), default=0.0, metavar="MP",
                   help="image megapixels the requests in the service may hold at once; others wait their turn "
                        "(0: twice --max-pixels)")
    s.add_argument("--timeout", type=_number(float, 0, above=True), default=60.0, help="seconds a request may wait for its matte (504)")
    s.add_argument("--url-timeout", type=_number(float, 0, above=True), default=10.0,
                   help="seconds to fetch a url= image, all of it: connecting, status line, headers, body")
    s.add_argument("--allow-private-urls", action="store_true",
                   help="let url= reach loopback, private, link-local and reserved addresses")
    s.add_argument("--io-threads", type=_number(int, 1), default=4, help="threads decoding and encoding images")
    c = p.add_argument_group("connections (what a client may hold before its request is read)")
    c.add_argument("--max-connections", type=_number(int, 1), default=64,
                   help="open connections in all; a few more may still ask /healthz, the rest get 503 at once "
                        "(lowered to fit ulimit -n)")
    c.add_argument("--max-connections-per-client", type=_number(int, 1), default=16, metavar="N",
                   help="open connections from one address (behind a proxy every client is the proxy: raise it)")
    c.add_argument("--header-timeout", type=_number(float, 0, above=True), default=10.0,
                   help="seconds from a request's first byte to the end of its headers (else 408, closed)")
    c.add_argument("--body-timeout", type=_number(float, 0, above=True), default=60.0,
                   help="seconds to receive a request's body after its headers (408), and for a client to "
                        "take its response")
    c.add_argument("--keep-alive", type=_number(float, 0, above=True), default=5.0,
                   help="seconds an idle connection (a new one, or between requests) is kept open")
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
                           max_pixels=int(args.max_pixels * 1_000_000),
                           max_model_pixels=int(args.max_model_pixels * 1_000_000), max_queue=args.max_queue,
                           queue_pixels=int(args.max_queue_pixels * 1_000_000),
                           timeout_s=args.timeout, fetch_timeout_s=args.url_timeout,
                           allow_private_urls=args.allow_private_urls, io_threads=args.io_threads,
                           max_connections=args.max_connections,
                           max_connections_per_client=args.max_connections_per_client,
                           header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                           keep_alive_s=args.keep_alive)


def _uvicorn_config(app, settings, log_level: str):
    """uvicorn's settings: its h11 protocol with the service's connection guard (connections.py says why)."""
    import uvicorn

    from modnet_npu.service.connections import ACCEPT_BATCH, guarded_protocol

    return uvicorn.Config(
        app, log_level=log_level, lifespan="on",
        http=guarded_protocol(app.state.connections),  # deadlines and caps before a request is read
        timeout_keep_alive=settings.keep_alive_s,  # the guard applies it to new connections too
        h11_max_incomplete_event_size=16 * 1024,  # request line and headers: h11's default, stated
        backlog=ACCEPT_BATCH,  # accepted in one go: must fit the descriptor budget (connections.py)
        limit_concurrency=None,  # the guard's caps instead: this one would answer 503 to /healthz too
        timeout_graceful_shutdown=10,  # then in-flight requests are cancelled (their URL fetches closed)
        server_header=False,
    )


def _serve(args: argparse.Namespace, opts: EngineOptions, settings, sock: socket.socket) -> int:
    """The app on ``sock`` under ``settings`` (the ServiceSettings :func:`_start` built and checked: made once)."""
    import uvicorn

    from modnet_npu.service.app import create_app

    failed: list[str] = []
    server: uvicorn.Server | None = None

    def fatal(message: str) -> None:
        failed.append(message)
        if server is not None:
            server.should_exit = True  # uvicorn polls it; the lifespan then closes the service

    from modnet_npu.service.connections import fit_to_descriptors

    settings, lowered = fit_to_descriptors(settings)
    if lowered:
        logging.getLogger("modnet.serve").warning("WARNING: %s", lowered)
    app = create_app(settings, lambda: _open_matter(opts), on_fatal=fatal)
    server = uvicorn.Server(_uvicorn_config(app, settings, args.log_level))
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
        check_local(opts.model)  # a missing local model file is one line, before the port is taken
        sock = _bind(args.host, args.port)  # a port in use is reported before the slow start
    except (ModnetError, OSError) as exc:
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
    proc = setup_process(threads=opts.threads, compile_cache_dir=compile_cache_dir(opts.models_dir),
                         max_image_pixels=int(args.max_pixels * 1_000_000), defer_torch=True)
    try:
        settings = _settings(args)
    except ValueError as exc:  # a limit out of range or at odds with another: a bad option, before the model loads
        raise UsageError(str(exc)) from None
    return _serve(args, replace(opts, threads=proc.threads), settings, sock)


if __name__ == "__main__":
    sys.exit(main())
