"""The connection level: what a client can hold before a request is even read.

uvicorn (0.3x-0.5x, its h11 protocol) arms no timer before a request's headers
are complete: its keep-alive time-out starts only after a response, and any
byte received cancels it. A client that connects and stays silent, or sends
one header line a minute, holds its socket for ever; a few hundred of them
exhaust the process's file descriptors, after which ``/healthz`` and every
request hang. ``limit_concurrency`` does not help: it answers 503 to requests
(``/healthz`` included) once the connections it counts are held.

:func:`guarded_protocol` is uvicorn's own ``H11Protocol`` with what it lacks,
passed to it as ``Config(http=...)``:

* **deadlines**: a new connection must start a request within the keep-alive
  time (``keep_alive_s``), a request's headers must be complete
  ``header_timeout_s`` after its first byte (else 408 and close), and its body
  within ``body_timeout_s`` after the headers (the app answers 408 first; the
  protocol closes the connection a little later as a backstop). A response
  the client does not take within ``body_timeout_s`` is dropped with its
  connection. A response sent before its request's body was read (a refusal)
  closes the connection, so the rest of that body is never waited for;
* **caps**: at most ``max_connections`` open connections and
  ``max_connections_per_client`` from one address. A client over its own cap
  is refused at once (503, closed). At the total, the connection that has
  waited longest without a request in progress (idle, or still sending its
  headers) is closed to make room, so held connections cannot lock newcomers
  out however many addresses they come from. When every connection has a
  request in progress, a small reserve (:data:`HEALTH_RESERVE`) is accepted
  with a short header deadline and answered only for ``/healthz`` (503 to
  anything else), so that a load balancer still sees the server while it is
  full; beyond that, 503 and close at accept;
* **quiet logs**: closings are counted and logged at most once per
  :data:`LOG_EVERY_S` per kind, and the event loop's ``accept() out of system
  resource`` (too many open files) is one line, not a traceback per attempt.

Why a protocol subclass rather than a front proxy or an ASGI middleware: the
ASGI app is called only once a request's headers are complete, so it cannot
time them; the protocol sees every byte and owns the socket. It overrides
five small methods of ``H11Protocol`` and calls the originals.
"""
from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter
from typing import Any, Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from modnet_npu.service.limits import ServiceSettings, clip

log = logging.getLogger("modnet.serve")

HEALTH_RESERVE = 8  # connections past --max-connections that may still ask /healthz
PROBATION_HEADER_TIMEOUT_S = 2.0  # for those
BODY_GRACE_S = 5.0  # the protocol's backstop after the app's own body deadline
LOG_EVERY_S = 10.0
FD_RESERVE = 64  # descriptors the process needs besides client sockets (model, logs, pools, fetches)
# The listen backlog, which is also how many connections asyncio accepts in one go before any of
# them can be refused and closed: the descriptor budget must hold that many more (uvicorn's 2048
# would exhaust a 1024-file limit in one burst, and each EMFILE stalls accepting for a second).
ACCEPT_BATCH = 128
_HEALTH_PATHS = ("/healthz",)
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"retry-after: 1\r\ncontent-length: %d\r\n\r\n%s")


def _raw_answer(template: bytes, message: str) -> bytes:
    body = b'{"detail": "%s"}' % message.encode()
    return template % (len(body), body)


class Throttled:
    """Log lines of one kind at most once per ``every`` seconds, with the count of those held back."""

    def __init__(self, every: float = LOG_EVERY_S) -> None:
        self.every = every
        self.last: dict[str, float] = {}
        self.held: Counter[str] = Counter()

    def warning(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self.last.get(kind, -self.every) < self.every:
            self.held[kind] += 1
            return
        held = self.held.pop(kind, 0)
        self.last[kind] = now
        more = f" (and {held} more like it in the last {self.every:g} s)" if held else ""
        log.warning("%s%s", message, more)


class ConnectionGuard:
    """The open connections, in total and per client address, and what was refused or closed."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.max_connections = settings.max_connections
        self.per_client = settings.max_connections_per_client
        self.open = 0
        self.by_client: Counter[str] = Counter()
        self.refused = 0
        self.closed: Counter[str] = Counter()  # why: idle, headers, body, response, evicted
        # connections without a request in progress, longest-waiting first (GuardedH11Protocol keeps it)
        self.waiting: dict[Any, None] = {}
        self.logs = Throttled()
        # called once when the server starts shutting down, before it waits for requests in flight
        self.on_shutdown: list[Callable[[], None]] = []
        self._shut = False

    def shutting_down(self) -> None:
        if not self._shut:
            self._shut = True
            for callback in self.on_shutdown:
                callback()

    def admit(self, client: str) -> str:
        """``"ok"``, ``"probation"`` (only /healthz) or ``"refuse"`` for a new connection from ``client``.

        At the total cap, the connection that has waited longest without a
        request in progress (idle, or still sending its headers) is closed to
        make room: held connections cannot lock newcomers out, from however
        many addresses they come. Only when every connection has a request in
        progress does a newcomer land in the /healthz reserve.
        """
        if self.by_client[client] >= self.per_client:
            return "refuse"
        if self.open >= self.max_connections and self.waiting:
            oldest = next(iter(self.waiting))
            oldest.evict()
        if self.open >= self.max_connections + HEALTH_RESERVE:
            return "refuse"
        return "probation" if self.open >= self.max_connections else "ok"

    def opened(self, client: str) -> None:
        self.open += 1
        self.by_client[client] += 1

    def gone(self, client: str) -> None:
        self.open -= 1
        self.by_client[client] -= 1
        if self.by_client[client] <= 0:
            del self.by_client[client]

    def stats(self) -> dict[str, Any]:
        return {"open": self.open, "clients": len(self.by_client), "refused": self.refused,
                "closed": dict(self.closed)}


def fit_to_descriptors(settings: ServiceSettings) -> tuple[ServiceSettings, str | None]:
    """``settings`` with ``max_connections`` lowered to what the file-descriptor limit allows, and why.

    The soft limit is raised to the hard one first, as servers do; what
    remains after :data:`FD_RESERVE`, the /healthz reserve and one burst of
    accepts (:data:`ACCEPT_BATCH`) is the most connections that can be open
    without ``accept`` failing.
    """
    from dataclasses import replace

    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        elif hard == resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY:
            pass  # keep the soft limit: raising it to "infinity" is refused on Linux
    except (OSError, ValueError):
        return settings, None
    if soft == resource.RLIM_INFINITY:
        return settings, None
    room = soft - FD_RESERVE - HEALTH_RESERVE - ACCEPT_BATCH
    if settings.max_connections <= room:
        return settings, None
    fitted = max(1, room)
    why = (f"--max-connections lowered from {settings.max_connections} to {fitted}: the process may open "
           f"{soft} files (ulimit -n); raise it to allow more")
    return replace(settings, max_connections=fitted,
                   max_connections_per_client=min(settings.max_connections_per_client, fitted)), why


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, every: float = LOG_EVERY_S) -> None:
    """The loop's ``socket.accept() out of system resource`` as one throttled line, without a traceback.

    asyncio retries the accept a second later by itself; each failure would
    otherwise write a traceback (EMFILE: too many open files).
    """
    previous = loop.get_exception_handler()
    throttled = Throttled(every)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message", "").startswith("socket.accept() out of system resource"):
            exc = context.get("exception")
            throttled.warning("accept", f"cannot accept connections: {exc} (retrying each second)")
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a :class:`ConnectionGuard`'s deadlines and caps (module docstring).

    Use :func:`guarded_protocol`, which binds the guard.
    """

    guard: ConnectionGuard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = ""  # what the armed deadline waits for: idle, headers, body, response
        self._address = ""
        self._counted = False
        self._probation = False

    # -- uvicorn's protocol interface -------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._address = self.client[0] if self.client else "-"
        verdict = self.guard.admit(self._address)
        if verdict == "refuse":
            self.guard.refused += 1
            guard = self.guard
            guard.logs.warning("refused", f"connection from {self._address} refused: "
                                          f"{guard.by_client[self._address]} open from it, {guard.open} in all")
            transport.write(_raw_answer(_REFUSED, "too many connections; retry shortly"))
            transport.close()
            return
        self.guard.opened(self._address)
        self._counted = True
        if verdict == "probation":
            self._probation = True
            self.app = _health_only(self.app)
        self._arm("idle", PROBATION_HEADER_TIMEOUT_S if self._probation else self.guard.settings.keep_alive_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._counted:
            self._counted = False
            self.guard.gone(self._address)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == "idle":  # the first byte of a request: its headers have this long
            timeout = PROBATION_HEADER_TIMEOUT_S if self._probation else self.guard.settings.header_timeout_s
            self._arm("headers", timeout)
        super().data_received(data)

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        cycle = self.cycle
        if cycle is None or self.transport.is_closing():
            return
        if cycle is not before:  # a request's headers are complete
            if cycle.more_body:
                self._arm("body", self.guard.settings.body_timeout_s + BODY_GRACE_S)
            else:
                self._disarm()
        elif self._phase == "body" and not cycle.more_body:
            self._disarm()

    def on_response_complete(self) -> None:
        if self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED) or self._probation:
            # answered before its body was read (a refusal), or a /healthz-only connection: done with it
            self._disarm()
            self.transport.close()
            return
        if self._phase != "response":  # still handing the response over: that deadline stays
            self._arm("idle", self.guard.settings.keep_alive_s)  # before a pipelined request is read, not after
        super().on_response_complete()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._arm("response", self.guard.settings.body_timeout_s)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._phase == "response":
            if self.cycle is not None and self.cycle.response_complete:
                self._arm("idle", self.guard.settings.keep_alive_s)
            else:
                self._disarm()

    def shutdown(self) -> None:
        self.guard.shutting_down()  # uvicorn calls this on every connection, first thing when it stops
        if self._phase in ("idle", "headers", "body"):  # nothing admitted yet: nothing to finish
            self._disarm()
            self.transport.close()
            return
        super().shutdown()

    # -- the deadline -------------------------------------------------------

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expired, phase, seconds)
        if phase in ("idle", "headers") and self._counted and not self._probation:
            self.guard.waiting[self] = None  # may be evicted for a newcomer (ConnectionGuard.admit)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._phase = ""
        self.guard.waiting.pop(self, None)

    def evict(self) -> None:
        """Closed now to make room for a new connection (it had no request in progress)."""
        self._disarm()
        self.guard.closed["evicted"] += 1
        self.guard.logs.warning("evicted", f"closed a waiting connection from {self._address} to make room "
                                           f"(--max-connections {self.guard.max_connections} reached)")
        if self._counted:  # counted out now: its connection_lost comes later
            self._counted = False
            self.guard.gone(self._address)
        self.transport.abort()

    def _expired(self, phase: str, seconds: float) -> None:
        self._deadline = None
        self._phase = ""
        self.guard.waiting.pop(self, None)
        if self.transport.is_closing():
            return
        self.guard.closed[phase] += 1
        what = {"idle": "sent nothing", "headers": "did not finish its request headers",
                "body": "did not send its body", "response": "did not take its response"}[phase]
        if phase != "idle":  # an idle keep-alive connection closing is normal, not news
            self.guard.logs.warning(phase, f"closed a connection from {self._address} that {what} "
                                           f"within {seconds:g} s")
        if phase == "headers":
            self.transport.write(_raw_answer(_REFUSED.replace(b"503 Service Unavailable", b"408 Request Timeout"),
                                             f"request headers not received within {seconds:g} s"))
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        if phase == "response" or self.transport.get_write_buffer_size():
            self.transport.abort()  # close() would wait for the client to read what is buffered
        else:
            self.transport.close()


class _ClippedAccessLog(logging.Filter):
    """uvicorn's access line with the request target cut short (it may be up to 16 KB of query string)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and len(args[2]) > 200:
            record.args = (*args[:2], clip(args[2], 200), *args[3:])
        return True


def clip_access_log() -> None:
    """Bound uvicorn's access lines (once; called at start-up, after uvicorn has set its logging up)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _ClippedAccessLog) for f in access.filters):
        access.addFilter(_ClippedAccessLog())


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """The protocol class to hand uvicorn (``Config(http=...)``), bound to ``guard``."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})


def _health_only(app: Any) -> Any:
    """``app`` for /healthz only: what a connection past --max-connections may ask."""

    async def guarded(scope: Any, receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and scope.get("path") in _HEALTH_PATHS:
            await app(scope, receive, send)
            return
        body = b'{"detail": "too many connections; retry shortly"}'
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                (b"connection", b"close"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return guarded
