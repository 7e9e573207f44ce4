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
"""
from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import os
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.exceptions import HTTPException as StarletteHTTPException

from modnet_npu.service import url_fetch
from modnet_npu.matting.imaging import (ImageReadError, ShortSide, Size, SizeSpec, cutout, load_image, parse_color,
                     parse_size_spec)
from modnet_npu.matting import codec
from modnet_npu.matting.codec import CONTENT_TYPES
from modnet_npu.matting.matter import MODES, Matter, render

log = logging.getLogger("modnet.serve")

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
MATTE_FIELDS = ("mode", "background", "size", "format", "url")
# rembg's server parameters that choose among its own models or tune its own
# post-processing: meaningless for MODNet, accepted so that existing clients work
REMBG_IGNORED = ("model", "a", "af", "ab", "ae", "ppm", "extras")
REMBG_HONOURED = {"om": "true: the matte only (mode=matte)",
                  "bgc": "r,g,b[,a]: the cutout over this colour (alpha 255: opaque, as mode=composite)"}
FORM_FIELDS = {*MATTE_FIELDS, *REMBG_IGNORED, "om", "bgc"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
# the image used to warm the model up: the size a typical upload is inferred at
_WARMUP_IMAGE = (512, 512)


@dataclass(frozen=True)
class ServiceSettings:
    """The service's limits and batching (``serve.py``'s options; ``fetch_threads`` has none)."""

    batch_window_ms: float = 5.0
    max_batch: int = 8
    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    max_queue: int = 64
    timeout_s: float = 60.0
    fetch_timeout_s: float = 10.0
    allow_private_urls: bool = False
    io_threads: int = 4
    fetch_threads: int = 4

    def __post_init__(self) -> None:
        checks = (("batch_window_ms", self.batch_window_ms >= 0), ("max_batch", self.max_batch >= 1),
                  ("max_bytes", self.max_bytes >= 1), ("max_pixels", self.max_pixels >= 1),
                  ("max_queue", self.max_queue >= 1), ("timeout_s", self.timeout_s > 0),
                  ("fetch_timeout_s", self.fetch_timeout_s > 0), ("io_threads", self.io_threads >= 1),
                  ("fetch_threads", self.fetch_threads >= 1))
        for name, ok in checks:
            if not ok:
                raise ValueError(f"{name.replace('_', '-')} out of range: {getattr(self, name)}")


class ApiError(Exception):
    """A request the service refuses: its HTTP status and a one-line message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# --------------------------------------------------------------------------
# admission: at most max_queue requests in the service at once
# --------------------------------------------------------------------------


class Admission:
    """Requests in the service, from the first byte read to the last byte encoded.

    Bounding them bounds memory (each holds at most a body of ``max_bytes`` and
    an image of ``max_pixels``) and the wait behind the inference worker; the
    rest are told to come back (503 with Retry-After) instead of piling up.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def enter(self) -> "Slot":
        if self.active >= self.limit:
            raise ApiError(503, f"server busy: {self.limit} requests already queued; retry shortly",
                           {"Retry-After": "1"})
        self.active += 1
        return Slot(self)


class Slot:
    """One admitted request; freed when both its handler and its inference (if any) are done.

    A request that timed out leaves its handler while its image may still be in
    a forward pass; the slot stays taken until that pass ends, so clients that
    retry after a 504 cannot pile up work behind the worker.
    """

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.refs = 1

    def share(self) -> "Slot":
        self.refs += 1
        return self

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            self.admission.active -= 1


# --------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Inferred:
    alpha: np.ndarray  # float matte at the image's own size
    inference_ms: float  # the forward pass this image rode in
    batch_size: int
    model_size: Size


@dataclass
class _Waiting:
    rgb: np.ndarray
    future: asyncio.Future
    arrived: float
    slot: Slot


class Batcher:
    """Waiting images grouped by model input size; each group run as one forward on one worker thread.

    A group runs when it holds ``max_batch`` images or its oldest image has
    waited ``window_s``, and only when the worker is free: while a forward
    runs, the next group keeps filling, so under load batches grow by
    themselves, and a lone request waits at most the window.
    """

    def __init__(self, infer: Callable[[list[np.ndarray], Size], list[np.ndarray]], *, window_s: float,
                 max_batch: int) -> None:
        self.infer = infer
        self.window_s = window_s
        self.max_batch = max_batch
        self.groups: dict[Size, list[_Waiting]] = {}
        # one thread: the device runs one forward at a time, and engines keep per-thread state
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self.forward_passes = 0
        self.images_inferred = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for items in self.groups.values():
            for item in items:
                item.future.cancel()
                item.slot.release()
        self.groups.clear()
        self.executor.shutdown(wait=True)

    def submit(self, rgb: np.ndarray, size: Size, slot: Slot) -> asyncio.Future:
        """A future of :class:`Inferred` for ``rgb`` at model input ``size``; cancel it to give up."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.groups.setdefault(size, []).append(_Waiting(rgb, future, loop.time(), slot.share()))
        assert self._wakeup is not None, "Batcher.start() first"
        self._wakeup.set()
        return future

    def waiting(self) -> int:
        return sum(len(items) for items in self.groups.values())

    def _take(self) -> tuple[Size, list[_Waiting]] | float:
        """The oldest group that is ready (full or past its window), or the seconds until one is."""
        now = asyncio.get_running_loop().time()
        ready: tuple[float, Size] | None = None
        wait = math.inf
        for size, items in list(self.groups.items()):
            for item in [it for it in items if it.future.done()]:  # given up (time-out) before running
                items.remove(item)
                item.slot.release()
            if not items:
                del self.groups[size]
                continue
            due = items[0].arrived + self.window_s - now
            if len(items) >= self.max_batch or due <= 0:
                if ready is None or items[0].arrived < ready[0]:
                    ready = (items[0].arrived, size)
            else:
                wait = min(wait, due)
        if ready is None:
            return wait
        size = ready[1]
        items = self.groups[size]
        taken, rest = items[: self.max_batch], items[self.max_batch :]
        if rest:
            self.groups[size] = rest
        else:
            del self.groups[size]
        return size, taken

    async def _next(self) -> tuple[Size, list[_Waiting]]:
        assert self._wakeup is not None
        while True:
            taken = self._take()
            if not isinstance(taken, float):
                return taken
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), None if math.isinf(taken) else taken)
            except asyncio.TimeoutError:
                pass

    async def _run(self) -> None:
        while True:
            size, items = await self._next()
            try:
                await self._run_batch(size, items)
            except Exception as exc:  # whatever the engine raised goes to this batch's requests, never ends the worker
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)
            finally:
                for item in items:
                    item.slot.release()

    async def _run_batch(self, size: Size, items: list[_Waiting]) -> None:
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        alphas = await loop.run_in_executor(self.executor, self.infer, [it.rgb for it in items], size)
        ms = (time.perf_counter() - start) * 1000.0
        self.forward_passes += 1
        self.images_inferred += len(items)
        for item, alpha in zip(items, alphas, strict=True):
            if not item.future.done():
                item.future.set_result(Inferred(alpha, ms, len(items), size))


# --------------------------------------------------------------------------
# request parameters
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MatteParams:
    mode: str = "cutout"
    background: str | tuple[int, ...] = "white"  # "blur", (r, g, b), or (r, g, b, a) from rembg's bgc
    size: SizeSpec | None = None  # None: the server's --size
    format: str = "png"


def parse_matte_params(fields: dict[str, str]) -> MatteParams:
    """``/api/matte``'s parameters; ValueError (422) naming the bad one."""
    unknown = sorted(set(fields) - set(MATTE_FIELDS))
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r}; known: {', '.join(MATTE_FIELDS)}")
    mode = fields.get("mode", "cutout").strip().lower() or "cutout"
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    fmt = fields.get("format", "png").strip().lower() or "png"
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in CONTENT_TYPES:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(CONTENT_TYPES)}")
    background: str | tuple[int, ...] = fields.get("background", "white").strip() or "white"
    if background.lower() == "blur":
        background = "blur"
    else:
        # parsed to numbers here: a string reaching make_background could name a file on the server
        background = parse_color(background)
    size = parse_size_spec(fields["size"]) if fields.get("size", "").strip() else None
    return MatteParams(mode, background, size, fmt)


def _flag(name: str, text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={text!r} is not true or false")


def parse_rembg_params(fields: dict[str, str]) -> MatteParams:
    """rembg's parameters: ``om`` (matte only), ``bgc`` (r,g,b[,a]); its model-specific ones ignored."""
    if _flag("om", fields.get("om", "false")):
        return MatteParams(mode="matte")
    bgc = fields.get("bgc", "").strip()
    if not bgc:
        return MatteParams(mode="cutout")
    try:
        rgba = tuple(int(v) for v in bgc.split(","))
    except ValueError:
        rgba = ()
    if len(rgba) not in (3, 4) or not all(0 <= v <= 255 for v in rgba):
        raise ValueError(f"bgc={bgc!r} is not r,g,b or r,g,b,a with values 0..255")
    return MatteParams(mode="composite", background=rgba if len(rgba) == 4 else (*rgba, 255))


# --------------------------------------------------------------------------
# pure work done on the I/O threads
# --------------------------------------------------------------------------


def decode_image(data: bytes, max_pixels: int, what: str = "image") -> np.ndarray:
    """uint8 RGB from encoded bytes: 413 over ``max_pixels`` (checked from the header, before
    decoding: a decompression bomb is a few KB), 415 for anything that is not an image."""
    if not data:
        raise ApiError(415, f"{what}: empty; send an image file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError:
        raise ApiError(413, f"{what}: too many pixels (over {max_pixels})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ApiError(415, f"{what}: not an image (PNG, JPEG, WebP, BMP, TIFF, GIF ...)") from None
    if width * height > max_pixels:
        raise ApiError(413, f"{what}: {width}x{height} is {width * height / 1e6:.1f} MP, over the limit of "
                            f"{max_pixels / 1e6:g} MP")
    try:
        return load_image(data)
    except ImageReadError as exc:
        raise ApiError(415, f"{what}: {str(exc).removeprefix('stdin: ')}") from None


def over_colour(rgb: np.ndarray, alpha: np.ndarray, rgba: tuple[int, ...]) -> np.ndarray:
    """The cutout laid over a colour with its own opacity (rembg's ``bgc``); RGB when opaque."""
    if rgba[3] == 255:
        background = np.broadcast_to(np.array(rgba[:3], np.uint8), rgb.shape)
        return render("composite", rgb, alpha, np.ascontiguousarray(background))
    if rgba[3] == 0:
        return cutout(rgb, alpha)
    a = np.clip(alpha, 0, 1)[..., None].astype(np.float32)
    b = np.float32(rgba[3] / 255.0)
    out_a = a + (1 - a) * b
    colour = np.array(rgba[:3], np.float32)
    out = (rgb.astype(np.float32) * a + colour * (1 - a) * b) / np.maximum(out_a, 1e-6)
    return np.concatenate([np.round(out), np.round(out_a * 255)], axis=2).astype(np.uint8)


def render_bytes(params: MatteParams, rgb: np.ndarray, alpha: np.ndarray,
                 background_image: np.ndarray | None) -> tuple[bytes, str]:
    """The encoded result and its content type."""
    if params.mode == "composite" and isinstance(params.background, tuple) and len(params.background) == 4:
        array = over_colour(rgb, alpha, params.background)
    else:
        background: str | np.ndarray
        if background_image is not None:
            background = background_image
        elif isinstance(params.background, tuple):
            background = np.full((*rgb.shape[:2], 3), params.background, np.uint8)
        else:
            background = params.background  # "blur"
        array = render(params.mode, rgb, alpha, background)
    return encode(array, params.format)


def encode(array: np.ndarray, fmt: str) -> tuple[bytes, str]:
    """Bytes in ``fmt`` (JPEG has no alpha: RGBA goes out as PNG) and their content type: ``codec.encode``."""
    encoded = codec.encode(array, fmt)
    return encoded.data, encoded.content_type


def parse_multipart(body: bytes, content_type: str, max_bytes: int) -> tuple[dict[str, str], dict[str, bytes]]:
    """(text fields, file fields) of a multipart/form-data body, all in memory (the body is bounded already)."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import FormParser, parse_options_header

    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart body without a boundary")
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}

    def on_field(f: Any) -> None:
        name = f.field_name.decode("utf-8", "replace")
        if name in ("file", "background"):  # an image sent without a file name (curl -F 'file=<photo.jpg')
            files[name] = f.value or b""
        else:
            fields[name] = (f.value or b"").decode("utf-8", "replace")

    def on_file(f: Any) -> None:
        f.file_object.seek(0)
        files[f.field_name.decode("utf-8", "replace")] = f.file_object.read()

    config = {"MAX_MEMORY_FILE_SIZE": max_bytes + 1, "MAX_BODY_SIZE": max_bytes, "MAX_FIELDS": 64}
    try:
        parser = FormParser("multipart/form-data", on_field, on_file, boundary=boundary, config=config)
        parser.write(body)
        parser.finalize()
    except (FormParserError, ValueError) as exc:
        raise ApiError(400, f"malformed multipart body: {exc}") from None
    return fields, files


# --------------------------------------------------------------------------
# the service: state shared by the routes
# --------------------------------------------------------------------------


@dataclass
class RequestInput:
    fields: dict[str, str]
    image: bytes | None = None
    background: bytes | None = None


@dataclass
class Service:
    settings: ServiceSettings
    open_matter: Callable[[], Matter]
    on_fatal: Callable[[str], None] = lambda message: None
    matter: Matter | None = None
    load_error: str | None = None
    requests_served: int = 0
    batcher: Batcher = field(init=False)
    admission: Admission = field(init=False)
    io_pool: ThreadPoolExecutor = field(init=False)
    fetch_pool: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.batcher = Batcher(self._infer, window_s=s.batch_window_ms / 1000.0, max_batch=s.max_batch)
        self.admission = Admission(s.max_queue)
        self.io_pool = ThreadPoolExecutor(s.io_threads, thread_name_prefix="io")
        self.fetch_pool = ThreadPoolExecutor(s.fetch_threads, thread_name_prefix="fetch")

    # -- start and stop -----------------------------------------------------

    def start(self) -> None:
        self.batcher.start()
        loop = asyncio.get_running_loop()
        # daemon: a download still running at Ctrl-C must not keep the process alive
        threading.Thread(target=self._load, args=(loop,), name="model-loader", daemon=True).start()

    def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            matter = self.open_matter()
            self.batcher.executor.submit(self._warm_up, matter).result()
        except Exception as exc:  # any failure to open the model ends the server with one line
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server stopped meanwhile
                loop.call_soon_threadsafe(self._failed, message)
            return
        try:
            loop.call_soon_threadsafe(self._ready, matter)
        except RuntimeError:  # the server stopped while the model loaded
            matter.close()

    def _warm_up(self, matter: Matter) -> None:
        """Off the request path: the batch sizes up to --max-batch compiled or captured at the size a typical
        upload gets (a per-shape fast path), else the first forwards (``Matter.warm_up``)."""
        matter.warm_up([matter.model_size(*_WARMUP_IMAGE)], max_batch=self.settings.max_batch)

    def _ready(self, matter: Matter) -> None:
        self.matter = matter
        log.info("ready: %s; model %s (%s)", matter.engine.description, os.path.basename(matter.source.path),
                 matter.source.source)
        if matter.source.warning:
            log.warning("WARNING: %s", matter.source.warning)

    def _failed(self, message: str) -> None:
        self.load_error = message
        log.error("error: model could not be loaded: %s", message)
        self.on_fatal(message)

    async def stop(self) -> None:
        await self.batcher.stop()
        self.io_pool.shutdown(wait=True)
        self.fetch_pool.shutdown(wait=True)
        if self.matter is not None:
            self.matter.close()

    # -- the work -----------------------------------------------------------

    def require_ready(self) -> Matter:
        if self.matter is not None:
            return self.matter
        if self.load_error is not None:
            raise ApiError(503, f"model could not be loaded: {self.load_error}")
        raise ApiError(503, "model still loading; retry shortly", {"Retry-After": "2"})

    def _infer(self, images: list[np.ndarray], size: Size) -> list[np.ndarray]:
        assert self.matter is not None
        return self.matter.infer_batch(images, size)

    async def on_io(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.io_pool, fn, *args)

    async def fetch(self, url: str) -> bytes:
        s = self.settings
        call = lambda: url_fetch.fetch(url, max_bytes=s.max_bytes, timeout=s.fetch_timeout_s,  # noqa: E731
                                       allow_private=s.allow_private_urls)
        try:
            fetched = await asyncio.get_running_loop().run_in_executor(self.fetch_pool, call)
        except url_fetch.UrlFetchError as exc:
            raise ApiError(exc.status, str(exc)) from None
        return fetched.data

    def model_size(self, matter: Matter, spec: SizeSpec | None, height: int, width: int) -> Size:
        """``Matter.model_size`` (the request's size, else the server's; ``--max-side``), its refusal a 422."""
        try:
            return matter.model_size(height, width, size=spec)
        except ValueError as exc:
            raise ApiError(422, f"size: {exc}" if spec is not None else str(exc)) from None

    async def infer(self, matter: Matter, rgb: np.ndarray, spec: SizeSpec | None, slot: Slot) -> Inferred:
        size = self.model_size(matter, spec, *rgb.shape[:2])
        future = self.batcher.submit(rgb, size, slot)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.settings.timeout_s)
        except asyncio.TimeoutError:
            future.cancel()  # still waiting: dropped from its group; running: its result is dropped
            raise ApiError(504, f"inference took over {self.settings.timeout_s:g} s") from None

    def info(self) -> dict[str, Any]:
        """What ``/api/info`` reports."""
        s = self.settings
        out: dict[str, Any] = {
            "ready": self.matter is not None,
            "load_error": self.load_error,
            "requests_served": self.requests_served,
            "forward_passes": self.batcher.forward_passes,
            "images_inferred": self.batcher.images_inferred,
            "in_service": self.admission.active,
            "batching": {"window_ms": s.batch_window_ms, "max_batch": s.max_batch, "inference_workers": 1},
            "limits": {"max_bytes": s.max_bytes, "max_pixels": s.max_pixels, "max_queue": s.max_queue,
                       "timeout_s": s.timeout_s, "url_timeout_s": s.fetch_timeout_s,
                       "private_urls_allowed": s.allow_private_urls},
            "rembg": {"routes": ["POST /api/remove", "GET /api/remove?url=..."], "honoured": REMBG_HONOURED,
                      "ignored_parameters": list(REMBG_IGNORED),
                      "note": "rembg's model choice and its alpha-matting and mask post-processing options "
                              "do not apply to MODNet: they are accepted and ignored"},
        }
        if self.matter is not None:
            out |= _engine_info(self.matter)
        return out


def _engine_info(matter: Matter) -> dict[str, Any]:
    engine, source = matter.engine, matter.source
    return {
        "model": {"source": source.source, "file": os.path.basename(source.path), "sha256": source.sha256,
                  "method": source.method, "warning": source.warning},
        "warning": source.warning,
        "backend": engine.name,
        "device": str(getattr(engine, "device", "cpu")),
        "precision": getattr(engine, "precision", "fp32"),
        "fast_path": engine.fast_path,
        "engine": engine.description,
        "model_size": _size_text(matter),
    }


def _size_text(matter: Matter) -> str:
    if matter.engine.fixed_size is not None:
        return "{}x{} (fixed by the model file)".format(*matter.engine.fixed_size)
    spec = matter.size
    if spec == "auto":
        return "auto"
    if isinstance(spec, ShortSide):
        return f"short side {spec.pixels}"
    return "{}x{}".format(*spec)


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
