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

Every refusal is an :class:`ApiError`: a JSON body ``{"error": "..."}`` with its
status, and one log line.

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
import time
import urllib.parse
from dataclasses import dataclass
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from modnet_npu.matting.matter import Matter
from modnet_npu.service.admission import Inferred, Slot
from modnet_npu.service.codec import decode_image, parse_multipart, render_bytes
from modnet_npu.service.core import Service
from modnet_npu.service.limits import ApiError, ServiceSettings
from modnet_npu.service.params import FORM_FIELDS, MatteParams, parse_matte_params, parse_rembg_params

__all__ = ["ApiError", "ServiceSettings", "create_app"]

log = logging.getLogger("modnet.serve")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


@dataclass
class RequestInput:
    """What a request sent: its text fields, and the image and background bytes if uploaded."""

    fields: dict[str, str]
    image: bytes | None = None
    background: bytes | None = None



# --------------------------------------------------------------------------
# reading a request
# --------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) a declared or actual length over ``limit`` without keeping more."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body of {int(declared)} bytes is over the limit of {limit} bytes")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"body over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_input(request: Request, service: Service) -> RequestInput:
    """Query parameters, then the body: multipart (``file``, ``background``, fields), a form, or the raw image."""
    fields = dict(request.query_params)
    body = await read_body(request, service.settings.max_bytes) if request.method == "POST" else b""
    ctype = request.headers.get("content-type", "")
    kind = ctype.split(";", 1)[0].strip().lower()
    if kind == "multipart/form-data":
        form, files = await service.on_io(parse_multipart, body, ctype, service.settings.max_bytes)
        fields |= form
        return RequestInput(fields, files.get("file"), files.get("background"))
    if kind == "application/x-www-form-urlencoded":
        form = _as_form(body)
        if form is not None:
            return RequestInput(fields | form)
    return RequestInput(fields, body or None)


def _as_form(body: bytes) -> dict[str, str] | None:
    """The fields of a urlencoded body, or None when it is an image sent with that type.

    ``curl --data-binary @photo.jpg`` labels the photo as a form: a body counts
    as a form only when it is ASCII and names known parameters only.
    """
    if not body.isascii():
        return None
    form = dict(urllib.parse.parse_qsl(body.decode("ascii"), keep_blank_values=True))
    return form if form and set(form) <= FORM_FIELDS else None


async def _matte(request: Request, parse: Callable[[dict[str, str]], MatteParams]) -> Response:
    service: Service = request.app.state.service
    matter = service.require_ready()
    slot = service.admission.enter()
    started = time.perf_counter()
    try:
        payload, ctype, result = await _produce(request, service, matter, slot, parse)
    except ApiError:
        raise
    except Exception as exc:  # the engine or a library failed: one line in the log, no traceback to anyone
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise ApiError(500, f"internal error: {type(exc).__name__}: {reason}") from None
    finally:
        slot.release()
    service.requests_served += 1
    headers = {"X-Inference-Ms": f"{result.inference_ms:.1f}", "X-Model-Size": "{}x{}".format(*result.model_size),
               "X-Batch-Size": str(result.batch_size),
               "X-Request-Ms": f"{(time.perf_counter() - started) * 1000.0:.1f}"}
    return Response(payload, media_type=ctype, headers=headers)


async def _produce(request: Request, service: Service, matter: Matter, slot: Slot,
                   parse: Callable[[dict[str, str]], MatteParams]) -> tuple[bytes, str, Inferred]:
    """Read, check, decode, infer (batched), render and encode one request."""
    settings = service.settings
    try:
        inp = await asyncio.wait_for(read_input(request, service), settings.timeout_s)
    except asyncio.TimeoutError:  # a client trickling its body must not hold a slot for ever
        raise ApiError(408, f"request body not received within {settings.timeout_s:g} s") from None
    url = inp.fields.pop("url", "").strip()
    try:
        params = parse(inp.fields)
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None
    if url and inp.image is not None:
        raise ApiError(422, "send the image or a url, not both")
    data = inp.image if inp.image is not None else await service.fetch(url) if url else None
    if data is None:
        raise ApiError(422, "no image: send it as multipart field 'file', as the request body, or as 'url'")
    rgb = await service.on_io(decode_image, data, settings.max_pixels, "image")
    background = None
    if inp.background is not None and params.mode == "composite":
        background = await service.on_io(decode_image, inp.background, settings.max_pixels, "background")
    result = await service.infer(matter, rgb, params.size, slot)
    payload, ctype = await service.on_io(render_bytes, params, rgb, result.alpha, background)
    return payload, ctype, result


# --------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------


def _error(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    client = request.client.host if request.client else "-"
    log.warning("%d %s %s from %s: %s", status, request.method, request.url.path, client, message)
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(request, exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(request, 422, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # the cause on one line in the log, never a stack trace to the client
        reason = str(exc).splitlines()[0] if str(exc) else ""
        client = request.client.host if request.client else "-"
        log.error("500 %s %s from %s: %s: %s", request.method, request.url.path, client, type(exc).__name__, reason)
        return JSONResponse({"error": "internal error (the server's log has the cause)"}, status_code=500)


def _add_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(os.path.join(STATIC_DIR, "index.html"), headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        service: Service = request.app.state.service
        if service.matter is None:
            state = f"model could not be loaded: {service.load_error}" if service.load_error else "loading"
            return JSONResponse({"status": state}, status_code=503, headers={"Retry-After": "2"})
        return JSONResponse({"status": "ok"})

    @app.get("/api/info")
    async def info(request: Request) -> JSONResponse:
        return JSONResponse(request.app.state.service.info())

    @app.api_route("/api/matte", methods=["GET", "POST"])
    async def matte(request: Request) -> Response:
        return await _matte(request, parse_matte_params)

    @app.api_route("/api/remove", methods=["GET", "POST"])
    async def remove(request: Request) -> Response:
        return await _matte(request, parse_rembg_params)


def create_app(settings: ServiceSettings, open_matter: Callable[[], Matter], *,
               on_fatal: Callable[[str], None] = lambda message: None) -> FastAPI:
    """The app; ``open_matter`` runs once on a thread at start-up, ``on_fatal`` is called if it fails."""
    service = Service(settings, open_matter, on_fatal)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        try:
            yield
        finally:
            await service.stop()

    # no /docs or /redoc: their pages load scripts from a CDN, which many data centres cannot reach
    app = FastAPI(title="MODNet matting", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service
    _add_error_handlers(app)
    _add_routes(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
