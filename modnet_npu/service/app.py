"""The matting service: a FastAPI app that mattes images over HTTP, batched across requests.

``serve.py`` is its command line; :func:`create_app` builds the app from
:class:`ServiceSettings` and a function that opens the :class:`matting.Matter`
(called once, on a thread, after the server is listening: ``/healthz`` answers
503 until the model is loaded and warmed up).

Where the work happens, so that the event loop never waits on it:

* decoding, rendering and encoding: a bounded thread pool (``io_threads``);
* URL fetching: its own bounded pool (a slow remote server must not hold up decoding);
* inference: one worker thread per device, fed by :class:`Batcher`, which groups
  waiting requests by model input size and runs each group as one forward.

Every refusal is an :class:`ApiError`: a JSON body ``{"detail": "..."}`` with its
status (FastAPI's convention, which rembg's clients read), and one log line.

The package's other modules, each one idea: ``limits`` (settings, ApiError),
``admission`` (the queue and the batcher), ``params`` (request parameters and the
rembg layer), ``codec`` (decoding, rendering, encoding, multipart), ``core`` (the
model, pools and fetching shared by the routes), ``url_fetch`` (SSRF-safe fetching);
this module reads requests and holds the routes.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from modnet_npu.matting import foreground
from modnet_npu.matting.matter import Matter
from modnet_npu.service.admission import Inferred, Slot
from modnet_npu.service.codec import check_output, decode_probed, parse_multipart, probe_image, render_bytes
from modnet_npu.service.connections import ConnectionGuard, clip_access_log, quiet_accept_errors
from modnet_npu.service.core import Service
from modnet_npu.service.limits import SEND_CHUNK, ApiError, ServiceSettings, clip, first_line
from modnet_npu.service import rembg_compat
from modnet_npu.service.params import (FORM_FIELDS, MatteParams, matte_url, parse_matte_params, parse_rembg_params,
                                       rembg_url)
from modnet_npu.service.url_fetch import UrlFetchError

__all__ = ["ApiError", "ServiceSettings", "create_app"]

log = logging.getLogger("modnet.serve")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


@dataclass
class RequestInput:
    """What a request sent: its query string and form fields (apart: rembg's route reads some parameters
    from one and some from the other), and the image and background bytes if uploaded."""

    query: dict[str, str]
    form: dict[str, str] = field(default_factory=dict)
    image: bytes | bytearray | None = None
    background: bytes | bytearray | None = None


# what a route reads from a request: its parameters, and the url to fetch the image from (None: none)
Asks = Callable[[RequestInput, str], tuple[MatteParams, str | None]]


def matte_asks(inp: RequestInput, method: str) -> tuple[MatteParams, str | None]:
    """``/api/matte``: its parameters from the query string and the form alike (the form's win)."""
    fields = inp.query | inp.form
    return parse_matte_params(fields), matte_url(fields)


def remove_asks(inp: RequestInput, method: str) -> tuple[MatteParams, str | None]:
    """``/api/remove``: rembg's parameters from where rembg reads them (``rembg_compat.received``)."""
    params = parse_rembg_params(rembg_compat.received(inp.query, inp.form, method=method))
    return params, rembg_url(inp.query, inp.form, method=method, uploaded=inp.image is not None)


# --------------------------------------------------------------------------
# reading a request
# --------------------------------------------------------------------------


# A refusal that leaves the rest of the body unread: the connection cannot carry another request, and saying
# "close" keeps a client from sending its next one on it (and reading a reset instead of an answer).
_CLOSE = {"Connection": "close"}


async def read_body(request: Request, limit: int) -> bytearray:
    """The body, refusing (413) a declared or actual length over ``limit`` without keeping more.

    One growing buffer, not a list of chunks joined at the end: a body costs
    its own size once, not twice.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body of {int(declared)} bytes is over the limit of {limit} bytes", _CLOSE)
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise ApiError(413, f"body over the limit of {limit} bytes", _CLOSE)
        body += chunk
    return body


async def read_input(request: Request, service: Service) -> RequestInput:
    """Query parameters, then the body: multipart (``file``, ``background``, fields), a form, or the raw image."""
    query = dict(request.query_params)
    body = await read_body(request, service.settings.max_bytes) if request.method == "POST" else bytearray()
    ctype = request.headers.get("content-type", "")
    kind = ctype.split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        form, files = await service.on_io(parse_multipart, body, ctype, service.settings.max_bytes)
        return RequestInput(query, form, files.get("file"), files.get("background"))
    if kind == "application/x-www-form-urlencoded":
        fields = _as_form(body)
        if fields is not None:
            return RequestInput(query, fields)
    return RequestInput(query, {}, body or None)


def _as_form(body: bytes | bytearray) -> dict[str, str] | None:
    """The fields of a urlencoded body, or None when it is an image sent with that type.

    ``curl --data-binary @photo.jpg`` labels the photo as a form: a body counts
    as a form only when it is ASCII and names known parameters only (and at
    most as many as there are).
    """
    if not body.isascii():
        return None
    try:
        pairs = urllib.parse.parse_qsl(body.decode("ascii"), keep_blank_values=True, max_num_fields=len(FORM_FIELDS))
    except ValueError:  # more fields than any form of ours has
        return None
    form = dict(pairs)
    return form if form and set(form) <= FORM_FIELDS else None


async def _receive(request: Request, service: Service) -> RequestInput:
    """The request's input, read within --body-timeout (408), before it is admitted: a client that
    sends headers and no body holds its connection only, never a place in the queue."""
    timeout = service.settings.body_timeout_s
    try:
        return await asyncio.wait_for(read_input(request, service), timeout)
    except asyncio.TimeoutError:
        raise ApiError(408, f"request body not received within {timeout:g} s", _CLOSE) from None
    except ClientDisconnect:
        raise ApiError(499, "client closed the connection while sending its body") from None


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body has been read: nothing else arrives before that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_goes(request: Request, work: Awaitable[Any]) -> Any:
    """``work``'s result, or 499 as soon as the client disconnects (``work`` is cancelled: its
    URL fetch closes, its image leaves the batch queue)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):  # its own failure means nothing to a client that left
                await task
    if task.cancelled():
        raise ApiError(499, "client closed the connection before its answer was ready")
    return task.result()


class _Answer(Response):
    """A result whose slot is freed once the client has taken it (or has gone).

    Sent in pieces of :data:`limits.SEND_CHUNK`: the server waits for each to
    drain before writing the next, so a client that reads slowly holds its
    result here, counted against the queue, rather than in an unbounded
    socket buffer; one that stops reading is cut off by the connection's
    response deadline (``connections``).
    """

    def __init__(self, content: bytes, slot: Slot, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.slot = slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            body = memoryview(self.body)
            for start in range(0, max(len(body), 1), SEND_CHUNK):
                last = start + SEND_CHUNK >= len(body)
                await send({"type": "http.response.body", "body": bytes(body[start:start + SEND_CHUNK]),
                            "more_body": not last})
        finally:
            self.slot.release()


# a path to a source file (e.g. ONNX Runtime's "/onnxruntime_src/.../bfc_arena.cc:376"): kept from clients
_SOURCE_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.+@~-]+){2,}(?::\d+)?")


def _public_reason(exc: BaseException) -> str:
    """An unexpected failure as a client may see it: its first line, cut short, without file paths."""
    return _SOURCE_PATH.sub("…", first_line(exc))  # then cut to a line's length, as every message


async def _matte(request: Request, asks: Asks, url_status: Callable[[UrlFetchError], int] | None = None) -> Response:
    service: Service = request.app.state.service
    matter = service.require_ready()
    started = time.perf_counter()
    inp = await _receive(request, service)
    try:
        params, url = asks(inp, request.method)
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None
    if url is not None and inp.image is not None:
        raise ApiError(422, "send the image or a url, not both")
    if url is None and inp.image is None:
        raise ApiError(422, "no image: send it as multipart field 'file', as the request body, or as 'url'")
    if url is not None:  # the fetched image is this request's body: fetched before admission, as a body is read
        inp.image = await _unless_client_goes(request, service.fetch(url, url_status))
    slot = service.admission.enter()
    try:
        payload, ctype, result = await _unless_client_goes(request, _produce(service, matter, inp, params, slot))
    except BaseException as exc:
        slot.release()
        if isinstance(exc, (ApiError, asyncio.CancelledError)) or not isinstance(exc, Exception):
            raise
        # the engine or a library failed: the cause on one line in the log, no traceback or path to anyone
        raise ApiError(500, f"internal error: {_public_reason(exc)}", detail=first_line(exc)) from None
    service.requests_served += 1
    headers = {"X-Inference-Ms": f"{result.inference_ms:.1f}", "X-Model-Size": "{}x{}".format(*result.model_size),
               "X-Batch-Size": str(result.batch_size),
               "X-Request-Ms": f"{(time.perf_counter() - started) * 1000.0:.1f}"}
    return _Answer(payload, slot, media_type=ctype, headers=headers)


async def _produce(service: Service, matter: Matter, inp: RequestInput, params: MatteParams,
                   slot: Slot) -> tuple[bytes, str, Inferred]:
    """Check, decode, infer (batched), render and encode one admitted request.

    Everything that can be refused from a header (pixels, the output format's
    limits, the model input size) is, before the image is decoded; then its
    pixels wait their turn in the budget (:meth:`Admission.reserve`).
    """
    settings = service.settings
    if params.decontaminate and not foreground.available():
        raise ApiError(501, f"dc needs pymatting on the server: {foreground.INSTALL_HINT}")
    data, inp.image = inp.image, None  # the request's buffer goes once decoded: only ``data`` holds it now
    assert data is not None
    width, height = await service.on_io(probe_image, data, settings.max_pixels, "image")
    check_output(params.format, width, height)
    service.model_size(matter, params.size, height, width)  # the same for a rotated image: checked before decoding
    background_data = inp.background if params.mode == "composite" else None
    pixels = width * height
    if background_data is not None:
        bw, bh = await service.on_io(probe_image, background_data, settings.max_pixels, "background")
        pixels += bw * bh
    await service.admission.reserve(slot, pixels, settings.timeout_s)
    rgb = await service.on_io(decode_probed, data, "image")  # probed above: its header is not read again
    del data
    background = None
    if background_data is not None:
        background = await service.on_io(decode_probed, background_data, "background")
    size = service.model_size(matter, params.size, *rgb.shape[:2])
    result = await service.infer(matter, rgb, size, slot)
    payload, ctype = await service.on_io(render_bytes, params, rgb, result.alpha, background)
    return payload, ctype, result


# --------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------


def _error(request: Request, status: int, message: str, headers: dict[str, str] | None = None, *,
           detail: str | None = None) -> JSONResponse:
    client = request.client.host if request.client else "-"
    log.warning("%d %s %s from %s: %s", status, request.method, clip(request.url.path, 100), client,
                clip(detail or message))
    return JSONResponse({"detail": clip(message)}, status_code=status, headers=headers)


class _OneLineErrors:
    """Anything a route did not expect: one line in the log, a JSON 500 to the client, and nothing
    more (Starlette's own error middleware would hand it to uvicorn, which logs a traceback)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            client = (scope.get("client") or ("-",))[0]
            log.error("500 %s %s from %s: %s", scope.get("method"), clip(scope.get("path", ""), 100), client,
                      clip(first_line(exc)))
            if not started:
                body = {"detail": "internal error (the server's log has the cause)"}
                await JSONResponse(body, status_code=500)(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(request, exc.status, exc.message, exc.headers, detail=exc.detail)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(request, 422, f"{where}: {first.get('msg', 'invalid request')}")

    app.add_middleware(_OneLineErrors)


def _add_routes(app: FastAPI) -> None:
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers={"Cache-Control": "no-cache"})

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz(request: Request) -> JSONResponse:
        service: Service = request.app.state.service
        if service.matter is None:
            state = f"model could not be loaded: {service.load_error}" if service.load_error else "loading"
            return JSONResponse({"status": state}, status_code=503, headers={"Retry-After": "2"})
        return JSONResponse({"status": "ok"})

    @app.get("/api/info")
    async def info(request: Request) -> JSONResponse:
        out = request.app.state.service.info()
        out["connections"] = request.app.state.connections.stats()
        return JSONResponse(out)

    @app.api_route("/api/matte", methods=["GET", "POST"])
    async def matte(request: Request) -> Response:
        return await _matte(request, matte_asks)

    @app.api_route("/api/remove", methods=["GET", "POST"])
    async def remove(request: Request) -> Response:
        return await _matte(request, remove_asks, rembg_compat.url_status)


def create_app(settings: ServiceSettings, open_matter: Callable[[], Matter], *,
               on_fatal: Callable[[str], None] = lambda message: None) -> FastAPI:
    """The app; ``open_matter`` runs once on a thread at start-up, ``on_fatal`` is called if it fails.

    ``app.state.connections`` is the :class:`ConnectionGuard` that
    ``connections.guarded_protocol`` turns into uvicorn's protocol (``serve.py``
    does); under another server it only counts nothing.
    """
    service = Service(settings, open_matter, on_fatal)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        quiet_accept_errors(asyncio.get_running_loop())
        clip_access_log()
        service.start()
        try:
            yield
        finally:
            await service.stop()

    # no /docs or /redoc: their pages load scripts from a CDN, which many data centres cannot reach
    app = FastAPI(title="MODNet matting", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.connections = ConnectionGuard(settings)
    app.state.connections.on_shutdown.append(service.fetches.abort_all)  # never wait on a remote server
    _add_error_handlers(app)
    _add_routes(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
