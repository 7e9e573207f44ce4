"""The service's limits as pieces, without a server: admission and its pixel budget, the batch's
pixel cap, the memory bound, echo caps, multipart parts, text fields, output checks, PNG text
chunks, the connection guard's bookkeeping and its quiet accept-error log."""
from __future__ import annotations

import asyncio
import io
import logging
import resource
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from modnet_npu.service.admission import Admission, Batcher
from modnet_npu.service.codec import MAX_PARTS, check_output, decode_image, parse_multipart
from modnet_npu.service.connections import ConnectionGuard, HEALTH_RESERVE, fit_to_descriptors, quiet_accept_errors
from modnet_npu.service.limits import (AT_REST_BYTES_PER_PIXEL, FORWARD_BYTES_PER_MODEL_PIXEL,
                                       IO_PEAK_BYTES_PER_PIXEL, MAX_MESSAGE_CHARS, ApiError, ServiceSettings,
                                       memory_bound, shown)
from modnet_npu.service.params import parse_matte_params, parse_rembg_params

# --------------------------------------------------------------------------
# admission: a count and a pixel budget
# --------------------------------------------------------------------------


def test_pixels_wait_their_turn_and_are_returned_with_the_slot():
    async def run() -> list[str]:
        admission = Admission(limit=8, pixel_budget=100)
        order: list[str] = []
        first, second, third = admission.enter(), admission.enter(), admission.enter()
        await admission.reserve(first, 60, timeout=1)
        assert admission.pixels == 60

        async def wait(slot, pixels, name):
            await admission.reserve(slot, pixels, timeout=5)
            order.append(name)

        late = asyncio.ensure_future(wait(second, 50, "second"))  # does not fit beside the first
        later = asyncio.ensure_future(wait(third, 10, "third"))  # fits, but waits behind the second: in turn
        await asyncio.sleep(0.05)
        assert order == [] and admission.pixels == 60
        first.release()
        await asyncio.gather(late, later)
        assert admission.pixels == 60 and admission.active == 2
        second.release()
        third.release()
        assert admission.pixels == 0 and admission.active == 0
        return order

    assert asyncio.run(run()) == ["second", "third"]


def test_pixels_that_do_not_fit_in_time_are_a_503_and_leave_no_trace():
    async def run() -> None:
        admission = Admission(limit=8, pixel_budget=100)
        holder, waiter, after = admission.enter(), admission.enter(), admission.enter()
        await admission.reserve(holder, 90, timeout=1)
        with pytest.raises(ApiError) as err:
            await admission.reserve(waiter, 20, timeout=0.05)
        assert err.value.status == 503 and "MP of images in service" in err.value.message
        assert err.value.headers == {"Retry-After": "1"}
        await admission.reserve(after, 10, timeout=0.05)  # the given-up wait does not block the next one
        for slot in (holder, waiter, after):
            slot.release()
        assert admission.pixels == 0 and admission.active == 0

    asyncio.run(run())


def test_an_image_larger_than_the_budget_runs_alone():
    async def run() -> None:
        admission = Admission(limit=8, pixel_budget=100)
        slot = admission.enter()
        await admission.reserve(slot, 500, timeout=1)
        assert admission.pixels == 100
        slot.release()
        assert admission.pixels == 0

    asyncio.run(run())


def test_a_batch_holds_at_most_max_pixels_of_model_input():
    batcher = Batcher(lambda images, size: images, window_s=0, max_batch=8, max_pixels=2_100_000)
    assert batcher.capacity((512, 512)) == 8  # the default size: batching as before
    assert batcher.capacity((1024, 1024)) == 2
    assert batcher.capacity((1024, 2048)) == 1
    assert batcher.capacity((2048, 2048)) == 1  # never none
    assert Batcher(lambda i, s: i, window_s=0, max_batch=8).capacity((4096, 4096)) == 8


def test_the_memory_bound_at_the_defaults():
    s = ServiceSettings()
    bound = memory_bound(s, base=300_000_000)
    assert s.pixel_budget == 80_000_000
    assert bound.bodies == 64 * 20_000_000
    assert bound.multipart == 4 * 20_000_000
    assert bound.images == AT_REST_BYTES_PER_PIXEL * 80_000_000
    assert bound.io_work == IO_PEAK_BYTES_PER_PIXEL * 80_000_000  # min(4 x 40 MP, the 80 MP budget)
    assert bound.forward == FORWARD_BYTES_PER_MODEL_PIXEL * 2_100_000
    assert bound.total == 300_000_000 + 1_280_000_000 + 80_000_000 + 560_000_000 + 3_600_000_000 + 1_260_000_000
    # fewer I/O threads than the budget holds images: the I/O term follows the threads
    assert memory_bound(ServiceSettings(io_threads=1)).io_work == IO_PEAK_BYTES_PER_PIXEL * 40_000_000


def test_settings_refuse_a_budget_below_one_image():
    with pytest.raises(ValueError, match="queue-pixels"):
        ServiceSettings(max_pixels=40_000_000, queue_pixels=10_000_000)
    with pytest.raises(ValueError, match="header-timeout"):
        ServiceSettings(header_timeout_s=0)


# --------------------------------------------------------------------------
# what is echoed
# --------------------------------------------------------------------------


def test_messages_are_bounded_whatever_was_sent():
    huge = "m" * 19_000_000
    for parse, fields in ((parse_matte_params, {"mode": huge}), (parse_matte_params, {huge: "1"}),
                          (parse_matte_params, {"size": huge}), (parse_matte_params, {"background": huge}),
                          (parse_rembg_params, {"bgc": huge}), (parse_rembg_params, {"om": huge})):
        with pytest.raises(ValueError) as err:
            parse(fields)
        assert len(str(err.value)) < 200 and "19000000 characters" in str(err.value)
    assert len(ApiError(422, "x" * 10_000_000).message) == MAX_MESSAGE_CHARS
    assert ApiError(500, "two\nlines").message == "two lines"
    assert shown("mode") == "'mode'" and shown("x" * 100).endswith("(100 characters)")
    # a url may be long, but not without end
    parse_matte_params({"url": "http://example.com/" + "a" * 8000})
    with pytest.raises(ValueError, match="over the limit of 8192"):
        parse_matte_params({"url": "http://example.com/" + "a" * 9000})


# --------------------------------------------------------------------------
# multipart
# --------------------------------------------------------------------------

def _multipart(*parts: tuple[str, bytes, str | None]) -> tuple[bytes, str]:
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += b"--XyZ\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n" + value + b"\r\n"
    return out + b"--XyZ--\r\n", "multipart/form-data; boundary=XyZ"


def test_a_background_text_field_is_a_spec_and_an_image_field_an_image():
    png = _png_bytes()
    body, ctype = _multipart(("file", png, "a.png"), ("background", b"#1e88e5", None), ("mode", b"composite", None))
    fields, files = parse_multipart(body, ctype, 1_000_000)
    assert fields == {"background": "#1e88e5", "mode": "composite"} and files == {"file": png}
    body, ctype = _multipart(("file", png, None), ("background", b"blur", None))  # curl -F 'file=<a.png'
    assert parse_multipart(body, ctype, 1_000_000) == ({"background": "blur"}, {"file": png})
    body, ctype = _multipart(("file", png, None), ("background", png, None))  # curl -F 'background=<bg.png'
    assert parse_multipart(body, ctype, 1_000_000) == ({}, {"file": png, "background": png})


def test_multipart_parts_are_counted_and_the_parse_stops_there():
    part = b'--XyZ\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n'
    body = part * 365_000 + b"--XyZ--\r\n"
    with pytest.raises(ApiError) as err:
        parse_multipart(body, "multipart/form-data; boundary=XyZ", 20_000_000)
    assert err.value.status == 413 and f"more than {MAX_PARTS} parts" in err.value.message
    body = part * MAX_PARTS + b"--XyZ--\r\n"
    assert parse_multipart(body, "multipart/form-data; boundary=XyZ", 20_000_000)[0] == {"a": "1"}


# --------------------------------------------------------------------------
# images in and out
# --------------------------------------------------------------------------


def _png_bytes(height: int = 20, width: int = 30, extra: bytes = b"") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 200, np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    return png[:33] + extra + png[33:]  # after the IHDR chunk


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


@pytest.mark.parametrize("chunk", [
    _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"x" * 50_000_000, 9)),  # inflates past MAX_TEXT_CHUNK
    _chunk(b"iTXt", b"XML:com.adobe.xmp\0\x01\x00\0\0" + zlib.compress(b"z" * 5_000_000, 9)),
], ids=["zTXt-50MB", "iTXt-5MB"])
def test_a_big_png_text_chunk_does_not_make_the_image_unreadable(chunk):
    data = _png_bytes(extra=chunk)
    assert len(data) < 100_000
    rgb = decode_image(data, 1_000_000)
    assert rgb.shape == (20, 30, 3) and (rgb == 200).all()


def test_webp_has_a_side_limit_checked_before_any_work():
    check_output("webp", 16383, 10)
    check_output("png", 20000, 10)
    with pytest.raises(ApiError) as err:
        check_output("webp", 16384, 10)
    assert err.value.status == 422 and "16383" in err.value.message


# --------------------------------------------------------------------------
# the connection level
# --------------------------------------------------------------------------


def test_the_guard_caps_clients_then_the_total_then_keeps_a_healthz_reserve():
    guard = ConnectionGuard(ServiceSettings(max_connections=4, max_connections_per_client=2))
    for client in ("a", "a", "b", "b"):
        assert guard.admit(client) == "ok"
        guard.opened(client)
    assert guard.admit("a") == "refuse"  # its own cap
    for i in range(HEALTH_RESERVE):
        assert guard.admit(f"c{i}") == "probation"  # past the total: /healthz only
        guard.opened(f"c{i}")
    assert guard.admit("d") == "refuse"  # past the reserve
    guard.gone("a")
    assert guard.by_client["a"] == 1 and guard.open == 3 + HEALTH_RESERVE
    assert guard.stats()["clients"] == 2 + HEALTH_RESERVE


class _Waiting:
    """A connection with no request in progress, as GuardedH11Protocol registers it."""

    def __init__(self, guard: ConnectionGuard, client: str) -> None:
        self.guard, self.client, self.evicted = guard, client, False
        guard.opened(client)
        guard.waiting[self] = None

    def evict(self) -> None:
        self.evicted = True
        del self.guard.waiting[self]
        self.guard.gone(self.client)


def test_at_the_cap_the_longest_waiting_connection_makes_room():
    guard = ConnectionGuard(ServiceSettings(max_connections=3, max_connections_per_client=3))
    first, second, third = (_Waiting(guard, f"10.0.0.{i}") for i in range(3))
    assert guard.admit("10.0.0.9") == "ok" and first.evicted and not second.evicted
    guard.opened("10.0.0.9")  # it has a request in progress: not in waiting
    del guard.waiting[second], guard.waiting[third]  # and so have these now
    assert guard.admit("10.0.0.8") == "probation"  # nothing to evict: the /healthz reserve


def test_connections_are_fitted_to_the_descriptor_limit():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    fitted, why = fit_to_descriptors(ServiceSettings(max_connections=10_000_000))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)  # raised to the hard limit on the way
    if soft == resource.RLIM_INFINITY:
        pytest.skip("no descriptor limit here")
    assert fitted.max_connections < soft and why and "ulimit -n" in why
    assert fit_to_descriptors(ServiceSettings(max_connections=8)) == (ServiceSettings(max_connections=8), None)


def test_out_of_descriptors_is_one_line_not_a_traceback_per_accept(caplog):
    loop = asyncio.new_event_loop()
    try:
        quiet_accept_errors(loop, every=60)
        with caplog.at_level(logging.WARNING):
            for _ in range(1000):
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": OSError(24, "Too many open files")})
    finally:
        loop.close()
    lines = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
    assert len(lines) == 1 and lines[0].exc_info is None and "Too many open files" in lines[0].getMessage()
