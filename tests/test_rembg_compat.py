"""rembg compatibility, checked against rembg itself: the same requests to ``rembg s`` and to ``serve.py``.

For every parameter rembg 2.0.86 documents for ``/api/remove`` (``model a af
ab ae om ppm dc vm bgc extras``, and ``url`` on GET), with good and bad values,
sent where rembg reads them and where it does not, both servers get the same
request on 127.0.0.1 and must agree on the status, the content type and the
image mode; a refusal must be ``{"detail": "..."}`` here. Where rembg crashes
(500 "Internal Server Error": a text file, ``bgc=abc``, a URL that cannot be
reached or is not an image) ours must answer a JSON reason, or the image. The
differences left are listed in ``KNOWN_DIFFERENCES``, each with its reason,
and checked to be exactly those.

URLs: every one names 127.0.0.1 (an HTTP server of the test's own), or an
address both servers refuse without connecting (0.0.0.0, 224.0.0.1), or is
refused before any lookup (``test_every_url_stays_on_loopback`` checks it):
nothing but 127.0.0.1 is ever contacted. rembg refuses every loopback URL, so
to see what it does with what a URL answers it runs with one change: 127.0.0.1,
and only it, is not blocked (:data:`LOOPBACK_REMBG`); ``serve.py`` runs with
``--allow-private-urls``. Never sent: ``vm=true`` and a model other than
u2netp, for which rembg would download a model from the internet.
"""
from __future__ import annotations

import base64
import http.server
import functools
import io
import ipaddress
import os
import sys
import urllib.parse
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from conftest import PORTRAIT, ROOT, loopback_http
from modnet_npu.bench import peers_rembg as pr
from modnet_npu.service import rembg_compat

U = {"model": "u2netp"}  # rembg's default model (bria-rmbg) would be downloaded: name the one that is here
IMG = "{origin}/img.jpg"

# rembg 2.0.86 with 127.0.0.1 (only) unblocked, so that it fetches from the test's loopback server
LOOPBACK_REMBG = """
import importlib, sys
s = importlib.import_module("rembg.commands.s_command")
if not hasattr(s, "_is_blocked_ip"):
    sys.exit("rembg's s_command has no _is_blocked_ip: update LOOPBACK_REMBG for this rembg")
blocked = s._is_blocked_ip
s._is_blocked_ip = lambda ip: str(ip) != "127.0.0.1" and blocked(ip)
from rembg.cli import main
sys.exit(main())
"""


@dataclass(frozen=True)
class Case:
    name: str
    method: str = "POST"
    form: dict | None = None
    query: dict | None = None
    payload: str | None = "img"  # img, rgba, grey, text, empty, random, or None (no file)


def _get(name: str, url: str, **query: str) -> Case:
    return Case(name, "GET", None, {**U, "url": url, **query}, None)


CASES = [
    Case("plain", form=U),
    Case("om=true", form={**U, "om": "true"}),
    Case("om=Y", form={**U, "om": "Y"}),
    Case("om=TRUE", form={**U, "om": "TRUE"}),
    Case("om=off", form={**U, "om": "off"}),
    Case("om=maybe", form={**U, "om": "maybe"}),
    Case("om empty", form={**U, "om": ""}),
    Case("om spaces", form={**U, "om": "  "}),
    Case("om ' true '", form={**U, "om": " true "}),
    Case("alpha matting", form={**U, "a": "true", "af": "240", "ab": "10", "ae": "5"}),
    Case("a=maybe", form={**U, "a": "maybe"}),
    Case("af=300", form={**U, "af": "300"}),
    Case("af=abc", form={**U, "af": "abc"}),
    Case("af=240.0", form={**U, "af": "240.0"}),
    Case("af=5.5", form={**U, "af": "5.5"}),
    Case("af ' 5 '", form={**U, "af": " 5 "}),
    Case("af ' '", form={**U, "af": " "}),
    Case("ab=-1", form={**U, "ab": "-1"}),
    Case("ae=-1", form={**U, "ae": "-1"}),
    Case("ae=99", form={**U, "ae": "99"}),
    Case("ppm=true", form={**U, "ppm": "true"}),
    Case("ppm=nope", form={**U, "ppm": "nope"}),
    Case("dc=true", form={**U, "dc": "true"}),
    Case("dc=maybe", form={**U, "dc": "maybe"}),
    Case("vm=false", form={**U, "vm": "false"}),
    Case("vm=maybe", form={**U, "vm": "maybe"}),
    Case("a+om", form={**U, "a": "true", "om": "true"}),
    Case("ppm+om", form={**U, "ppm": "true", "om": "true"}),
    Case("dc+om", form={**U, "dc": "true", "om": "true"}),
    Case("a+dc", form={**U, "a": "true", "dc": "true"}),
    Case("model=foo", form={"model": "foo"}),
    Case("model=U2NETP", form={"model": "U2NETP"}),
    Case("model spaces", form={"model": "  "}),
    Case("bgc opaque", form=U, query={"bgc": "255,0,0,255"}),
    Case("bgc rgb", form=U, query={"bgc": "255,0,0"}),
    Case("bgc clear", form=U, query={"bgc": "255,0,0,0"}),
    Case("bgc half", form=U, query={"bgc": "255,0,0,128"}),
    Case("bgc clipped", form=U, query={"bgc": "300,-5,0"}),
    Case("bgc spaced", form=U, query={"bgc": " 1, 2 ,3"}),
    Case("bgc empty", form=U, query={"bgc": ""}),
    Case("bgc ' '", form=U, query={"bgc": " "}),
    Case("bgc=abc", form=U, query={"bgc": "abc"}),
    Case("bgc two", form=U, query={"bgc": "1,2"}),
    Case("bgc five", form=U, query={"bgc": "1,2,3,4,5"}),
    Case("om+bgc", form={**U, "om": "true"}, query={"bgc": "255,0,0,255"}),
    Case("dc+bgc", form={**U, "dc": "true"}, query={"bgc": "0,0,255,255"}),
    Case("extras bad json", form=U, query={"extras": "{not json"}),
    Case("extras", form=U, query={"extras": '{"foo": 1}'}),
    Case("extras empty", form=U, query={"extras": ""}),
    # sent where rembg's POST does not read them: ignored there, so here
    Case("om in the query", form=U, query={"om": "true"}),
    Case("om=maybe in the query", form=U, query={"om": "maybe"}),
    Case("model=foo in the query", form=U, query={"model": "foo"}),
    Case("bgc in the form", form={**U, "bgc": "abc"}),
    Case("url beside a file", form={**U, "url": IMG}),
    # what is uploaded
    Case("rgba png", form=U, payload="rgba"),
    Case("grey png", form=U, payload="grey"),
    Case("grey png om", form={**U, "om": "true"}, payload="grey"),
    Case("text file", form=U, payload="text"),
    Case("empty file", form=U, payload="empty"),
    Case("random bytes", form=U, payload="random"),
    Case("no file", form=U, payload=None),
    Case("url, no file", form={**U, "url": IMG}, payload=None),
    Case("bad url, no file", form={**U, "url": "ftp://127.0.0.1/x.jpg"}, payload=None),
    Case("PUT", "PUT", form=U),
    # GET: every parameter from the query string, an empty value included
    Case("GET without url", "GET", None, U, None),
    _get("GET url", IMG),
    _get("GET url om", IMG, om="true"),
    _get("GET url bgc", IMG, bgc="0,0,255"),
    _get("GET url dc", IMG, dc="true"),
    _get("GET url om empty", IMG, om=""),
    _get("GET url af empty", IMG, af=""),
    _get("GET url bgc empty", IMG, bgc=""),
    _get("GET url bgc=abc", IMG, bgc="abc"),
    _get("GET url om=maybe", IMG, om="maybe"),
    _get("GET url af=300", IMG, af="300"),
    Case("GET url model empty", "GET", None, {"model": "", "url": IMG}, None),
    Case("GET url model=foo", "GET", None, {"model": "foo", "url": IMG}, None),
    _get("GET bad url om=maybe", "ftp://127.0.0.1/x.jpg", om="maybe"),
    # GET: the URL itself
    _get("url empty", ""),
    _get("url ' '", " "),
    _get("url not a url", "not a url"),
    _get("url ftp", "ftp://127.0.0.1/x.jpg"),
    _get("url file", "file:///etc/passwd"),
    _get("url no host", "http:///x.jpg"),
    _get("url bad ipv6", "http://[::1/x.jpg"),
    _get("url unspecified", "http://0.0.0.0:9/x.jpg"),
    _get("url multicast", "http://224.0.0.1/x.jpg"),
    _get("url closed port", "http://127.0.0.1:{closed}/x.jpg"),
    _get("url text", "{origin}/text"),
    _get("url 404", "{origin}/404"),
    _get("url 404 with an image", "{origin}/404img"),
    _get("url too large", "{origin}/big"),
    _get("url redirect without Location", "{origin}/noloc"),
    _get("url 4 redirects", "{origin}/hop/4"),
    _get("url 5 redirects", "{origin}/hop/5"),
    _get("url redirect to ftp", "{origin}/to-ftp"),
    _get("url redirect to 0.0.0.0", "{origin}/to-zero"),
    _get("url with credentials", "http://me:pw@{host}/auth"),
    _get("url without credentials", "{origin}/auth"),
]

# name -> (rembg's status, ours, why): the differences left, on purpose
KNOWN_DIFFERENCES = {
    "url, no file": (422, 200, "rembg's POST reads no url (422: file missing); this service fetches it"),
    "bad url, no file": (422, 400, "rembg's POST reads no url; this service refuses a bad one as rembg's GET does"),
    "url 404 with an image": (200, 502, "rembg mattes whatever body an error answer has; this service "
                                        "reports the source's HTTP 404"),
}


@functools.lru_cache(maxsize=None)  # bytes: the same few images for every case, and every GET of the origin
def _image(mode: str, fmt: str) -> bytes:
    img = Image.open(PORTRAIT).resize((96, 96))
    buf = io.BytesIO()
    img.convert(mode).save(buf, fmt)
    return buf.getvalue()


def _payload(kind: str | None) -> bytes | None:
    if kind in ("img", "rgba", "grey"):
        return _image(*{"img": ("RGB", "JPEG"), "rgba": ("RGBA", "PNG"), "grey": ("L", "PNG")}[kind])
    return {"text": b"hello, not an image", "empty": b"", "random": np.random.default_rng(0).bytes(300),
            None: None}[kind]


class _Origin(http.server.BaseHTTPRequestHandler):
    """What the URLs lead to: an image, text, errors, a declared 60 MiB, redirects, a password-protected image."""

    AUTH = "Basic " + base64.b64encode(b"me:pw").decode()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        path = self.path
        if path == "/img.jpg" or (path == "/auth" and self.headers.get("Authorization") == self.AUTH):
            self._send(200, _payload("img"), "image/jpeg")
        elif path.startswith("/hop/"):
            left = int(path.rsplit("/", 1)[1])
            self._send(302, b"", location="/img.jpg" if left == 1 else f"/hop/{left - 1}")
        elif path in ("/to-ftp", "/to-zero"):
            self._send(302, b"", location="ftp://127.0.0.1/x.jpg" if path == "/to-ftp" else "http://0.0.0.0:9/x.jpg")
        elif path == "/noloc":
            self._send(302, b"")
        elif path == "/big":  # declared over both limits (rembg's 50 MiB, ours 20 MB); nothing sent
            self.send_response(200)
            self.send_header("Content-Length", str(60 << 20))
            self.end_headers()
        else:
            status = {"/text": 200, "/auth": 401}.get(path, 404)
            self._send(status, _payload("img") if path == "/404img" else b"hello, not an image", "text/plain")

    def _send(self, status: int, body: bytes, ctype: str = "text/plain", location: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _filled(case: Case, where: dict[str, str]) -> tuple[dict | None, dict | None]:
    """The case's form and query with {origin}, {host} and {closed} filled in."""
    def one(value: str) -> str:
        for key, text in where.items():  # not str.format: extras hold braces of their own
            value = value.replace("{" + key + "}", text)
        return value

    def fill(fields: dict | None) -> dict | None:
        return None if fields is None else {k: one(v) for k, v in fields.items()}

    return fill(case.form), fill(case.query)


def _send(url: str, case: Case, where: dict[str, str]) -> tuple[int, str, str | None, object]:
    import httpx

    form, query = _filled(case, where)
    data = _payload(case.payload)
    files = {"file": ("p.png", data, "application/octet-stream")} if data is not None else None
    r = httpx.request(case.method, url + "/api/remove", params=query or None, data=form or None, files=files,
                      timeout=300)
    ctype = r.headers.get("content-type", "").split(";")[0]
    mode = Image.open(io.BytesIO(r.content)).mode if ctype.startswith("image/") else None
    body = r.json() if ctype == "application/json" else None
    return r.status_code, ctype, mode, body


@pytest.fixture(scope="module")
def origin():
    with loopback_http(_Origin) as server:
        yield server.server_address[1]


@pytest.fixture(scope="module")
def servers(flavour_files, tmp_path_factory, origin):
    try:
        rembg = pr.find_rembg()
    except pr.RembgUnavailable as exc:
        pytest.skip(str(exc))
    if "u2netp" not in rembg.models:
        pytest.skip(f"u2netp.onnx not in {rembg.home}")
    tmp = tmp_path_factory.mktemp("compat")
    launcher = tmp / "loopback_rembg.py"
    launcher.write_text(LOOPBACK_REMBG)
    p1, p2 = pr.free_port(), pr.free_port()
    theirs = pr.Server([rembg.python, str(launcher), "s", "--no-ui", "-h", "127.0.0.1", "-p", str(p1), "-l",
                        "warning"], p1, "/openapi.json", str(tmp / "rembg.log"), env=rembg.env(1))
    ours = pr.Server([sys.executable, str(ROOT / "serve.py"), "--host", "127.0.0.1", "--port", str(p2), "--model",
                      flavour_files["official"], "--backend", "ort", "--threads", "1", "--log-level", "warning",
                      "--allow-private-urls"], p2, "/healthz", str(tmp / "ours.log"), env=dict(os.environ))
    with theirs, ours:
        yield theirs.url, ours.url


def _where(origin: int) -> dict[str, str]:
    return {"origin": f"http://127.0.0.1:{origin}", "host": f"127.0.0.1:{origin}", "closed": str(pr.free_port())}


@pytest.mark.slow
def test_every_documented_parameter_answers_as_rembg_does(servers, origin):
    rembg_url, ours_url = servers
    where = _where(origin)
    found, crashes = {}, []
    for case in CASES:
        theirs, ours = _send(rembg_url, case, where), _send(ours_url, case, where)
        if ours[3] is not None:  # every refusal here: FastAPI's {"detail": "..."}, one line
            assert list(ours[3]) == ["detail"] and isinstance(ours[3]["detail"], str), (case.name, ours[3])
        if theirs[0] == 500:  # rembg crashed: ours answers with a reason (or the image) instead
            assert ours[0] != 500 and (ours[0] == 200 or ours[1] == "application/json"), (case.name, ours)
            crashes.append(case.name)
        elif theirs[:3] != ours[:3]:
            found[case.name] = (theirs[0], ours[0])
    assert found == {name: k[:2] for name, k in KNOWN_DIFFERENCES.items()}, found
    # the URLs that reach the origin and fail there crash rembg: checked, not skipped
    assert {"url text", "url 404", "url closed port", "url without credentials", "bgc=abc"} <= set(crashes)


def test_every_url_stays_on_loopback():
    """No case names a host but 127.0.0.1, or one both servers refuse before connecting; redirects likewise."""
    where = _where(8)
    urls = [v for case in CASES for d in _filled(case, where) if d for k, v in d.items() if k == "url"]
    urls += ["ftp://127.0.0.1/x.jpg", "http://0.0.0.0:9/x.jpg", "/img.jpg"]  # the origin's redirect targets
    assert len(urls) > 30
    for url in urls:
        try:
            parts = urllib.parse.urlsplit(url.strip())
            host = parts.hostname
        except ValueError:
            continue  # refused as invalid by both, before any lookup
        if parts.scheme not in ("http", "https") or not host:
            continue  # refused by scheme or for no host, before any lookup
        ip = ipaddress.ip_address(host)  # a name would be looked up: never one
        assert str(ip) == "127.0.0.1" or ip.is_unspecified or ip.is_multicast, url


def test_the_known_differences_are_cases():
    names = [case.name for case in CASES]
    assert len(names) == len(set(names)) and set(KNOWN_DIFFERENCES) <= set(names)


@pytest.mark.slow
def test_dc_changes_colours_at_soft_edges_only(servers):
    import httpx

    _, ours_url = servers
    data = _payload("img")
    plain, clean = (np.asarray(Image.open(io.BytesIO(httpx.post(
        ours_url + "/api/remove", data={"dc": dc}, files={"file": ("p.jpg", data)}, timeout=300).content)))
        for dc in ("false", "true"))
    assert plain.shape == clean.shape == (96, 96, 4)
    assert np.array_equal(plain[..., 3], clean[..., 3])  # the matte is the same
    soft = (plain[..., 3] > 12) & (plain[..., 3] < 243)
    assert soft.any() and not np.array_equal(plain[soft, :3], clean[soft, :3])


def test_parameters_are_read_where_rembg_reads_them():
    received = rembg_compat.received
    query = {"om": "true", "bgc": "1,2,3", "extras": "{}", "url": "x", "zzz": "1"}
    form = {"model": "u2netp", "om": "", "dc": "true", "bgc": "9,9,9", "url": "y"}
    assert received(query, form, method="GET") == {"om": "true", "bgc": "1,2,3", "extras": "{}"}
    # POST: model..vm from the form (an empty value there: not sent), bgc and extras from the query
    assert received(query, form, method="POST") == {"model": "u2netp", "dc": "true", "bgc": "1,2,3", "extras": "{}"}
    assert received({"om": ""}, {}, method="GET") == {"om": ""}  # an empty query value is a value


def test_parse_follows_rembgs_validation():
    parse = rembg_compat.parse
    assert parse({}) == rembg_compat.RembgRequest()
    assert parse({"om": "Y"}).only_mask and not parse({"om": "off"}).only_mask
    assert parse({"bgc": "300,-5,0"}).bgc == (255, 0, 0, 255)  # Pillow clips; three numbers: opaque
    assert parse({"bgc": " 1, 2,3,4"}).bgc == (1, 2, 3, 4)
    assert parse({"bgc": ""}).bgc is None  # rembg: ``if bgc``
    assert parse({"dc": "true", "model": "u2net_human_seg", "af": "240.0", "ae": " 99 "}).decontaminate
    assert parse({"model": "my-u2netp-copy"}).bgc is None  # rembg's pattern is searched, not matched
    for bad, says in [({"om": "maybe"}, "om='maybe'"), ({"a": "2"}, "a='2'"), ({"af": "256"}, "out of range"),
                      ({"ab": "x"}, "not a whole number"), ({"ae": "-1"}, "out of range"), ({"vm": "?"}, "vm="),
                      ({"model": "U2NETP"}, "not one of rembg's models"), ({"bgc": "1,2"}, "bgc='1,2'"),
                      ({"bgc": "abc"}, "bgc='abc'"), ({"af": "2.5"}, "not a whole number"),
                      ({"om": ""}, "om=''"), ({"om": " true "}, "om=' true '"), ({"af": " "}, "not a whole number"),
                      ({"model": ""}, "not one of rembg's models"), ({"bgc": " "}, "bgc=' '")]:
        with pytest.raises(ValueError, match=says):
            parse(bad)
