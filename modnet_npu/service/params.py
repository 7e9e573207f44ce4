"""Request parameters: ``/api/matte``'s own and the rembg-compatible layer (``/api/remove``).

Each parser takes the request's text fields and returns :class:`MatteParams`,
or raises ValueError (answered 422) naming the bad one.
"""
from __future__ import annotations

from dataclasses import dataclass

from modnet_npu.matting.codec import CONTENT_TYPES  # the one encoder's formats
from modnet_npu.matting.imaging import SizeSpec, parse_color, parse_size_spec
from modnet_npu.matting.matter import MODES
from modnet_npu.service import rembg_compat
from modnet_npu.service.limits import MAX_VALUE_CHARS, shown

MATTE_FIELDS = ("mode", "background", "size", "format", "url", "dc")
# rembg's server parameters (validated as rembg does: rembg_compat); those that choose among its own
# models or tune its own post-processing are meaningless for MODNet, accepted so that existing clients work
REMBG_IGNORED = rembg_compat.IGNORED
REMBG_HONOURED = rembg_compat.HONOURED
FORM_FIELDS = {*MATTE_FIELDS, *rembg_compat.FIELDS}
MAX_SPEC_CHARS = 256  # any parameter but url (and rembg's ignored extras): a mode, a colour, a size is a few characters


@dataclass(frozen=True)
class MatteParams:
    mode: str = "cutout"
    background: str | tuple[int, ...] = "white"  # "blur", (r, g, b), or (r, g, b, a) from rembg's bgc
    size: SizeSpec | None = None  # None: the server's --size
    format: str = "png"
    decontaminate: bool = False  # dc: the foreground's own colour at soft edges (matting/foreground.py)


def check_lengths(fields: dict[str, str]) -> None:
    """ValueError for a value no parameter could need: refused before it is parsed or quoted."""
    for name, value in fields.items():
        limit = MAX_VALUE_CHARS if name in ("url", "extras") else MAX_SPEC_CHARS
        if len(value) > limit:
            raise ValueError(f"{shown(name)}: a value of {len(value)} characters is over the limit of {limit}")


def parse_matte_params(fields: dict[str, str]) -> MatteParams:
    """``/api/matte``'s parameters; ValueError (422) naming the bad one."""
    unknown = sorted(set(fields) - set(MATTE_FIELDS))
    if unknown:
        raise ValueError(f"unknown parameter {shown(unknown[0])}; known: {', '.join(MATTE_FIELDS)}")
    check_lengths(fields)
    mode = fields.get("mode", "cutout").strip().lower() or "cutout"
    if mode not in MODES:
        raise ValueError(f"mode {shown(mode)} is not one of {', '.join(MODES)}")
    fmt = fields.get("format", "png").strip().lower() or "png"
    fmt = "jpg" if fmt == "jpeg" else fmt
    if fmt not in CONTENT_TYPES:
        raise ValueError(f"format {shown(fmt)} is not one of {', '.join(CONTENT_TYPES)}")
    background: str | tuple[int, ...] = fields.get("background", "white").strip() or "white"
    if background.lower() == "blur":
        background = "blur"
    else:
        # parsed to numbers here: a string reaching make_background could name a file on the server
        background = parse_color(background)
    size = parse_size_spec(fields["size"]) if fields.get("size", "").strip() else None
    return MatteParams(mode, background, size, fmt, _flag("dc", fields.get("dc", "false")))


def _flag(name: str, text: str) -> bool:
    """``/api/matte``'s booleans read as rembg's are, surrounding spaces allowed; an empty value is as if not sent."""
    return bool(text.strip()) and rembg_compat.parse_bool(name, text.strip())


def matte_url(fields: dict[str, str]) -> str | None:
    """``/api/matte``'s ``url`` (from the form or the query string); None when not sent or empty."""
    return fields.get("url", "").strip() or None


def parse_rembg_params(fields: dict[str, str]) -> MatteParams:
    """rembg's parameters as its route received them (``rembg_compat.received``), validated as rembg
    validates them (``rembg_compat``); ``om``, ``bgc`` and ``dc`` honoured."""
    check_lengths(fields)
    req = rembg_compat.parse(fields)
    if req.only_mask:
        return MatteParams(mode="matte")
    if req.bgc is None:
        return MatteParams(mode="cutout", decontaminate=req.decontaminate)
    return MatteParams(mode="composite", background=req.bgc, decontaminate=req.decontaminate)


def rembg_url(query: dict[str, str], form: dict[str, str], *, method: str, uploaded: bool) -> str | None:
    """``/api/remove``'s ``url``; None when there is none to fetch.

    GET: the query's ``url`` as rembg reads it: present but empty is a URL
    (that rembg refuses, 400), not a missing one (422). POST: rembg reads no
    url; this service takes one from the form or the query string when no image
    was uploaded, and ignores it beside an upload, as rembg does.
    """
    if method == "GET":
        url = query.get("url")
    elif uploaded:
        return None
    else:
        url = form.get("url") or query.get("url") or None  # an empty value: not sent
    if url is not None:
        check_lengths({"url": url})
    return url
