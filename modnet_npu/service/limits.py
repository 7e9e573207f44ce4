"""The service's limits and its one refusal type.

:class:`ServiceSettings` holds ``serve.py``'s limits and batching options;
:class:`ApiError` is every refusal: an HTTP status and a one-line message,
answered as ``{"error": "..."}``.
"""
from __future__ import annotations

from dataclasses import dataclass


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

