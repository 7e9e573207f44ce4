"""rembg's ``/api/remove`` parameters, read and validated the way rembg 2.0.86's server does.

Checked against rembg itself (``tests/test_rembg_compat.py`` sends the same
requests to ``rembg s`` and to ``serve.py``). rembg declares its parameters
with FastAPI (``rembg/commands/s_command.py``), so FastAPI decides where each
is read and pydantic what is accepted:

* where (:func:`received`): ``GET`` reads every parameter from the query
  string; ``POST`` reads ``model a af ab ae om ppm dc vm`` from the form and
  ``bgc``, ``extras`` from the query string. A parameter sent elsewhere is
  ignored, as rembg ignores it (``POST ...?om=true`` is a cutout there too);
* an empty form value means "not sent" (FastAPI's rule for forms, exactly
  ``""``); an empty query value is a value, refused below like any other;
* booleans ``a``, ``om``, ``ppm``, ``dc``, ``vm``: ``1 on t true y yes`` /
  ``0 off f false n no``, any case, no surrounding spaces; anything else is a 422;
* ``af``, ``ab``: whole numbers 0..255; ``ae``: a whole number >= 0 (``240.0``
  and surrounding spaces pass, as in pydantic's lax mode); else 422;
* ``model``: must contain one of rembg's session names (its pattern is
  searched, not matched, and is case-sensitive); else 422;
* ``bgc``: comma-separated integers, 3 or 4 of them (empty: none); rembg hands
  them to Pillow, which clips each to 0..255, and always answers RGBA (alpha
  255 when three are given). Where rembg crashes (500: ``bgc=abc``, two or
  five numbers) this layer answers 422 naming the parameter instead;
* a ``url`` rembg will not use is a 400 (:func:`url_status`).

What MODNet honours: ``om`` (the matte alone), ``bgc`` (the cutout over a
colour) and ``dc`` (the foreground's colour estimated at soft edges, see
``modnet_npu/matting/foreground.py``). The rest choose among rembg's own models
or tune its post-processing; they are validated, then have no effect.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from modnet_npu.service.limits import shown
from modnet_npu.service.url_fetch import UrlFetchError, UrlRejected

# rembg 2.0.86's session names (rembg.sessions.sessions_names), the pattern its server checks `model` against
REMBG_MODELS = ("birefnet-general", "birefnet-general-lite", "birefnet-general-fp16", "birefnet-portrait",
                "birefnet-dis", "birefnet-hrsod", "birefnet-cod", "birefnet-massive", "isnet-anime", "dis_custom",
                "isnet-general-use", "sam", "silueta", "u2net_cloth_seg", "u2net_custom", "u2net_human_seg", "u2net",
                "u2netp", "bria-rmbg", "ben_custom", "withoutbg", "atlascloud")
_MODEL_PATTERN = re.compile("(" + "|".join(map(re.escape, REMBG_MODELS)) + ")")
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})
BOOLEANS = ("a", "om", "ppm", "dc", "vm")
INTEGERS = {"af": (0, 255), "ab": (0, 255), "ae": (0, None)}
HONOURED = {"om": "true: the matte only (mode=matte)",
            "bgc": "r,g,b[,a]: the cutout over this colour, RGBA as rembg answers (values clipped to 0..255)",
            "dc": "true: the foreground's own colour at soft edges, no background spill (needs pymatting)"}
IGNORED = ("model", "a", "af", "ab", "ae", "ppm", "vm", "extras")
FIELDS = (*HONOURED, *IGNORED)
# where rembg's POST reads them (FastAPI's Form and Query); its GET reads all of them from the query string
FORM_PARAMS = ("model", "a", "af", "ab", "ae", "om", "ppm", "dc", "vm")
QUERY_PARAMS = ("bgc", "extras")
URL_REFUSED = 400  # rembg's status for a URL it will not use (invalid, refused, too large, bad redirects)


@dataclass(frozen=True)
class RembgRequest:
    """What a rembg request asks of MODNet: the matte only, a background colour (RGBA), decontaminated colours."""

    only_mask: bool = False
    bgc: tuple[int, int, int, int] | None = None
    decontaminate: bool = False


def received(query: dict[str, str], form: dict[str, str], *, method: str) -> dict[str, str]:
    """rembg's parameters as its route receives them: from where it reads each (module docstring),
    without the form's empty values; the others are not rembg's and are ignored."""
    if method == "GET":
        return {name: query[name] for name in FIELDS if name in query}
    given = {name: form[name] for name in FORM_PARAMS if form.get(name, "") != ""}
    return given | {name: query[name] for name in QUERY_PARAMS if name in query}


def url_status(exc: UrlFetchError) -> int:
    """rembg's status for a URL: 400 for one the asker must change (``url_fetch.UrlRejected``); where the
    source fails (unreachable, an HTTP error, too slow) rembg crashes (500), so this service's own stands."""
    return URL_REFUSED if isinstance(exc, UrlRejected) else exc.status


def parse_bool(name: str, text: str) -> bool:
    """A boolean parameter as rembg (pydantic) reads it: 1/0, on/off, t/f, true/false, y/n, yes/no, any case,
    nothing around it; ValueError naming it otherwise (the value clipped: it is echoed back)."""
    value = text.lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={shown(text)} is not true or false")


def _int(name: str, text: str, low: int, high: int | None) -> int:
    value: int | None
    try:
        value = int(text.strip())
    except ValueError:
        try:
            number = float(text.strip())
            value = int(number) if number.is_integer() else None
        except (ValueError, OverflowError):
            value = None
    if value is None:
        raise ValueError(f"{name}={text!r} is not a whole number")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}={text!r} is out of range {low}..{'' if high is None else high}")
    return value


def _bgc(text: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in (3, 4):
        raise ValueError(f"bgc={text!r} is not r,g,b or r,g,b,a (whole numbers)")
    clipped = tuple(min(255, max(0, v)) for v in values)
    return clipped if len(clipped) == 4 else (*clipped, 255)  # type: ignore[return-value]


def parse(given: dict[str, str]) -> RembgRequest:
    """rembg's parameters as its route received them (:func:`received`); ValueError (a 422) naming the first
    bad one."""
    model = given.get("model")
    if model is not None and not _MODEL_PATTERN.search(model):
        raise ValueError(f"model={model!r} is not one of rembg's models ({', '.join(REMBG_MODELS)}); "
                         "MODNet answers for any of them")
    flags = {name: parse_bool(name, given[name]) for name in BOOLEANS if name in given}
    for name, (low, high) in INTEGERS.items():
        if name in given:
            _int(name, given[name], low, high)
    bgc = _bgc(given["bgc"]) if given.get("bgc") else None  # rembg: ``if bgc`` (empty: none)
    return RembgRequest(only_mask=flags.get("om", False), bgc=bgc, decontaminate=flags.get("dc", False))
