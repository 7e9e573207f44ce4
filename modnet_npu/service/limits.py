"""The service's limits, the memory they bound together, and its one refusal type.

:class:`ServiceSettings` holds ``serve.py``'s limits and batching options;
:func:`memory_bound` is the worst case of those limits together (what an
operator sizes the machine or container for); :class:`ApiError` is every
refusal: an HTTP status and a one-line message, answered as ``{"detail": "..."}``
(FastAPI's convention, which rembg's clients read).

Nothing a client sent is echoed back whole: :func:`shown` quotes a value cut to
a few dozen characters, and an :class:`ApiError` message never exceeds
:data:`MAX_MESSAGE_CHARS`, so a 19 MB parameter cannot become a 19 MB error body
or log line.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from modnet_npu.cli import one_line

MAX_MESSAGE_CHARS = 300  # an error body or log line, whatever was sent
MAX_SHOWN_CHARS = 40  # a client's value quoted in a message
MAX_VALUE_CHARS = 8192  # a parameter value (a url may be long; nothing else needs to be)
SEND_CHUNK = 1 << 20  # a result is handed to the socket this much at a time

# Memory per pixel, for memory_bound. How each was found (python3, Pillow 13, numpy, ONNX
# Runtime 1.32, torch CPU; peak RSS of a fresh process, 40 MP random images, so that
# compression does not help):
# - at rest, an admitted image holds its uint8 RGB (3 B/px) and then its float32 matte
#   (4 B/px) until encoded: 7 B/px, by construction;
# - on an I/O thread, decoding or rendering one image peaks at 13-27 B/px for decoding
#   (8-bit RGB ... 16-bit grey PNG), 11 B/px for PNG/JPEG renders and 43 B/px for a
#   lossless WebP cutout (libwebp's own buffers): 45 B/px covers all of them;
# - one forward pass holds 430-510 B per model input pixel on ONNX Runtime (its arena
#   grows by powers of two) and 565 B on the PyTorch CPU engine: 600 B/px.
AT_REST_BYTES_PER_PIXEL = 7
IO_PEAK_BYTES_PER_PIXEL = 45
FORWARD_BYTES_PER_MODEL_PIXEL = 600


@dataclass(frozen=True)
class ServiceSettings:
    """The service's limits and batching (``serve.py``'s options; ``fetch_threads`` has none).

    ``queue_pixels`` 0 means twice ``max_pixels`` (one composite with an uploaded
    background of the largest size must fit).
    """

    batch_window_ms: float = 5.0
    max_batch: int = 8
    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000
    max_model_pixels: int = 2_100_000  # 512x4096 (the auto size's widest) and 1024x2048 fit
    max_queue: int = 64
    queue_pixels: int = 0
    timeout_s: float = 60.0
    fetch_timeout_s: float = 10.0
    allow_private_urls: bool = False
    io_threads: int = 4
    fetch_threads: int = 4
    # the connection level (serve.py hands these to connections.guarded_protocol)
    max_connections: int = 64
    max_connections_per_client: int = 16
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    keep_alive_s: float = 5.0

    def __post_init__(self) -> None:
        positive = {"max_batch", "max_bytes", "max_pixels", "max_model_pixels", "max_queue", "io_threads",
                    "fetch_threads", "max_connections", "max_connections_per_client", "timeout_s",
                    "fetch_timeout_s", "header_timeout_s", "body_timeout_s", "keep_alive_s"}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool):
                continue
            if value < 0 or (f.name in positive and value == 0):
                raise ValueError(f"{f.name.replace('_', '-')} out of range: {value}")
        if self.queue_pixels and self.queue_pixels < self.max_pixels:
            raise ValueError(f"queue-pixels ({self.queue_pixels}) must be at least max-pixels ({self.max_pixels})")

    @property
    def pixel_budget(self) -> int:
        """Image pixels the admitted requests may hold at once."""
        return self.queue_pixels or 2 * self.max_pixels


@dataclass(frozen=True)
class MemoryBound:
    """The worst case of the limits together, in bytes, term by term (``base`` measured at start)."""

    base: int  # the process with its model loaded and warmed up
    bodies: int  # per open connection: one body (or fetched image) until decoded, or a result's last piece
    multipart: int  # parts copied out of a body while it is parsed, one per I/O thread
    images: int  # admitted images at rest: RGB and matte
    io_work: int  # decoding, rendering and encoding, one image per I/O thread
    forward: int  # the one forward pass at a time

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def to_dict(self) -> dict[str, float]:
        """Megabytes, term by term, and the total."""
        out = {f.name: round(getattr(self, f.name) / 1e6, 1) for f in fields(self)}
        out["total"] = round(self.total / 1e6, 1)
        return out


def memory_bound(settings: ServiceSettings, base: int = 0) -> MemoryBound:
    """The most memory the limits allow together (module comment: where each constant comes from)."""
    s = settings
    return MemoryBound(
        base=base,
        bodies=s.max_connections * max(s.max_bytes, SEND_CHUNK),
        multipart=s.io_threads * s.max_bytes,
        images=AT_REST_BYTES_PER_PIXEL * s.pixel_budget,
        io_work=IO_PEAK_BYTES_PER_PIXEL * min(s.io_threads * s.max_pixels, s.pixel_budget),
        forward=FORWARD_BYTES_PER_MODEL_PIXEL * s.max_model_pixels,
    )


def clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` on one line, cut to ``limit`` characters (an ellipsis says it was cut): ``cli.one_line``."""
    return one_line(text, limit)


def shown(value: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """A client's value quoted for a message: its repr, cut, with its length when cut."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def first_line(exc: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class ApiError(Exception):
    """A request the service refuses: its HTTP status and a one-line message (at most MAX_MESSAGE_CHARS).

    ``detail``, when given, is what the server's log says instead of the
    message (the cause of a 500, which the client sees without file paths).
    """

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, *,
                 detail: str | None = None) -> None:
        message = clip(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})  # its own: a shared constant (app._CLOSE) is never changed through it
        self.detail = clip(detail) if detail else message
