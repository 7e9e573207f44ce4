"""The HTTP load of the service benchmarks: clients posting one image at once, each on its own connection.

Used by the ``serve`` suite (``serve.py`` batching on and off, ``POST /api/matte``)
and by the peers suite's servers (``rembg s`` against ``serve.py``, ``POST
/api/remove``). Each client is a thread with its own keep-alive connection
posting the image again and again; every request's wall time is kept.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass(frozen=True)
class Load:
    """One load: its clients, each request's wall time, the whole load's wall time, the requests not answered 200.

    ``forward_passes``: the forward passes ``serve.py`` ran meanwhile, where the
    caller read its ``/api/info`` around the load (None otherwise).
    """

    clients: int
    latencies_ms: tuple[float, ...]
    seconds: float
    errors: int
    forward_passes: int | None = None

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def rate(self) -> float:
        """Requests answered 200 per second of the load."""
        return (self.requests - self.errors) / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class Request:
    """What every request of a load posts: ``image`` as the multipart part ``file`` (named ``filename``),
    ``fields`` beside it, to ``url``; none waits longer than ``timeout_s``."""

    url: str
    image: bytes
    filename: str = "photo.jpg"
    fields: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 300.0


def _client(request: Request, count: int, deadline: float | None) -> tuple[list[float], int]:
    import httpx

    latencies, errors = [], 0
    files = {"file": (request.filename, request.image, "image/jpeg")}
    with httpx.Client(timeout=request.timeout_s) as client:
        for _ in range(count):
            if deadline is not None and time.monotonic() > deadline:
                break
            start = time.perf_counter()
            r = client.post(request.url, files=files, data=dict(request.fields))
            latencies.append((time.perf_counter() - start) * 1000.0)
            errors += r.status_code != 200
    return latencies, errors


def drive(request: Request, *, clients: int, per_client: int, deadline: float | None = None) -> Load:
    """``clients`` threads posting ``per_client`` requests each, all at once; none starts after ``deadline``
    (``time.monotonic()``; None: no deadline)."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(lambda _: _client(request, per_client, deadline), range(clients)))
    seconds = time.perf_counter() - start
    return Load(clients, tuple(ms for lat, _ in parts for ms in lat), seconds, sum(e for _, e in parts))
