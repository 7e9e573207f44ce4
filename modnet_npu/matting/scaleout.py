"""Scale-out: ``inference.py --ray``, the local path's job on a Ray cluster.

Ray Data streams three stages that overlap: decoding in CPU tasks (one image
per row, decoded by our own function, so a corrupt file is one error row and
never a lost block), inference in a fixed pool of actors (one per NPU or GPU,
else CPU actors) that each load the model once and infer batches of same-size
images, then rendering and atomic writes in CPU tasks. A video goes whole to
one actor (``video.process_video``: frame order, audio, alpha). On a fast path made
per shape (``--compile``, graph capture) each actor prepares, before its first
batch, the model input sizes the driver read from the inputs' headers
(``warmup``), and the run prints that set and its cost once. The rules —
output names, what is still to do, atomic writes, one error line per input —
are ``jobs``'s; the local path (``jobs.run_jobs``) stays the reference.

Ray is optional (``requirements-ray.txt``) and imported only when used.
Multi-node: the project folder, the model file, the inputs and the output
folder must be visible at the same paths on every node (a shared file system).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from modnet_npu import REPO_ROOT
from modnet_npu.errors import ModnetError
from modnet_npu.fileio import temp_affixes
from modnet_npu.matting import warmup
from modnet_npu.matting.jobs import IoPool, Job, Progress, RunSummary, load_job, save_job
from modnet_npu.runtime.options import EngineOptions, choose_engine, compile_cache_dir

INSTALL_HINT = "pip install -r requirements-ray.txt"
RESOURCE = {"npu": "NPU", "cuda": "GPU"}  # Ray's names for the accelerators
# Logical CPUs reserved per inference actor and per decode/encode task. An actor
# holding whole CPUs can leave none to the read tasks that feed it, and Ray then
# waits for ever instead of failing: a fraction keeps CPUs for the tasks. Whole
# CPUs per task keep the number of worker processes (each imports torch) down:
# on two cores, half-CPU tasks started 12 workers and made the first run 1.6x
# slower. The values also differ on purpose: equal remote arguments would let Ray
# Data fuse decoding into the actor, and decoding would stop overlapping inference.
ACTOR_CPUS = 0.5
TASK_CPUS = 1.0
_EMPTY_RGB = np.zeros((0, 0, 3), np.uint8)
_EMPTY_ALPHA = np.zeros((0, 0), np.float32)
_LOCAL = ("local", None)
_RAY_LOG_PREFIX = re.compile(r"^\[[^\]]*\] \S+: ")  # "[2026-01-01 12:00:00,000 W 1 1] file.cc:1: "


class ScaleoutError(ModnetError, RuntimeError):
    """Ray missing, a cluster out of reach or without the resources asked for, or a failed run; one line."""


# --------------------------------------------------------------------------
# options and placement (no Ray needed: decided from the cluster's resources)
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalRay:
    """How a Ray started for the run is sized (``None``: Ray's own default)."""

    num_cpus: int | None = None
    object_store_mb: int | None = None
    temp_dir: str | None = None


@dataclass(frozen=True)
class Placement:
    backend: str  # "torch" or "ort"
    device: str  # as each actor opens it: Ray makes its one device index 0
    actors: int
    threads: int  # per actor; 0 = automatic: the CPUs free on its node at its start
    why: str
    ray_args: dict = field(default_factory=dict)  # num_gpus / resources of one actor

    def describe(self) -> str:
        threads = "the free CPUs of its node" if self.threads == 0 else f"{self.threads} thread(s)"
        return f"ray: {self.actors} {self.backend} actor(s) on {self.device}, {threads} each ({self.why})"


def check_address(address: str) -> str:
    """``local`` (start a Ray for the run), ``auto``, ``ray://host:port`` or ``host:port``; ValueError otherwise."""
    if address in ("local", "auto") or address.startswith("ray://"):
        return address
    host, _, port = address.rpartition(":")
    if host and port.isdigit():
        return address
    raise ValueError(f"--ray {address}: not a Ray address; give none (a local Ray for the run), auto, "
                     "ray://HOST:PORT or HOST:PORT (write --ray=ADDRESS, or put --ray after the inputs)")


def _accelerator(cluster: dict) -> str:
    return "npu" if cluster.get("NPU", 0) >= 1 else "cuda" if cluster.get("GPU", 0) >= 1 else "cpu"


def _engine_choice(backend: str, device: str, precision: str, cluster: dict) -> tuple[str, str, str]:
    """(backend, device kind, why): ``options.choose_engine``'s decision, asked about the cluster's resources."""
    def found() -> tuple[str, str]:
        kind = _accelerator(cluster)
        return kind, "no accelerator in the cluster" if kind == "cpu" else f"the cluster has {RESOURCE[kind]}s"

    choice = choose_engine(backend, device, precision, find_accelerator=found)
    kind = choice.device.kind
    return choice.backend, _accelerator(cluster) if kind == "auto" else kind, choice.why


def _describe(cluster: dict) -> str:
    shown = {k: v for k, v in cluster.items() if k in ("CPU", "GPU", "NPU")}
    return ", ".join(f"{v:g} {k}" for k, v in sorted(shown.items())) or "no CPU, GPU or NPU"


def place(*, backend: str, device: str, precision: str, cluster: dict, nodes: int = 1, actors: int | None = None,
          threads: int = 0) -> Placement:
    """The actor pool for a run on a cluster with ``cluster`` resources (``ray.cluster_resources()``).

    Raises ScaleoutError *before* anything is submitted when the cluster lacks
    the device, or when the actors would reserve every CPU: Ray would wait for
    ever in both cases rather than fail.
    """
    backend, kind, why = _engine_choice(backend, device, precision, cluster)
    key = RESOURCE.get(kind)
    have = cluster.get(key, 0) if key else None
    if key and have < 1:
        raise ScaleoutError(f"--device {device}: the Ray cluster has no {key} (it has {_describe(cluster)}); "
                            f"start its nodes with the devices, or use --device cpu")
    count = actors or (int(have) if key else 1 if kind == "mps" else max(1, nodes))
    if key and count > have:
        raise ScaleoutError(f"{count} actors need {count} {key}s; the Ray cluster has {have:g}")
    cpus = cluster.get("CPU", 0)
    if count * ACTOR_CPUS + TASK_CPUS > cpus:
        raise ScaleoutError(f"{count} inference actors would reserve every CPU of the Ray cluster "
                            f"({_describe(cluster)}), leaving none to read and write the images; "
                            "use fewer actors or add CPUs")
    if threads == 0 and (key or count > nodes):
        threads = max(1, int(cpus // count))  # actors that share a node share its cores
    if key and ":" in device:
        why += f"; the index in {device} is not used: Ray gives each actor a device of its own"
    ray_args = {"num_gpus": 1} if kind == "cuda" else {"resources": {"NPU": 1}} if kind == "npu" else {}
    return Placement(backend, kind, count, threads, why, ray_args)


# --------------------------------------------------------------------------
# Ray itself: import, quiet, session
# --------------------------------------------------------------------------


def require_ray() -> Any:
    """The ``ray`` module with Ray Data, or ScaleoutError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is the part used)
    except ImportError as exc:
        raise ScaleoutError(f"--ray needs Ray Data, which is not installed here ({exc}); {INSTALL_HINT}") from None
    _quiet_loggers()
    return ray


def _quiet_loggers() -> None:
    """Ray's Python loggers at warning level, less two warnings every run would print, and duplicated tracebacks.

    The progress-bar notice (ours replace Ray Data's) and the note that a Ray
    started for the run uses token authentication (it does; that is right).
    """
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # Ray Data logs the traceback of a failed run before raising it; run_on_ray
    # turns every such failure into one line, so the traceback would only bury it
    logging.getLogger("ray.data.exceptions").setLevel(logging.CRITICAL)


def _init_quietly(ray: Any, address: str | None, args: dict) -> None:
    """``ray.init`` with what Ray's C++ core writes straight to file descriptor 2 held back.

    It announces its log level on every start, a line no user needs, and
    repeats a failed connection attempt once a second; when the start fails,
    its last line (an authentication token refused, say) joins our one-line error.
    """
    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            ray.init(**args)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            os.dup2(saved, 2)
            held.seek(0)
            said = [_RAY_LOG_PREFIX.sub("", line).strip() for line in held.read().decode(errors="replace").splitlines()
                    if line.strip() and "Set ray log level" not in line]
            ray.shutdown()
            reason = _first_line(exc) + (f"; Ray said: {said[-1]}" if said else "")
            raise ScaleoutError(f"--ray {address or 'local'}: Ray did not start or connect ({reason})") from None
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _start_args(address: str | None, local: LocalRay) -> dict:
    args: dict[str, Any] = {"address": address or "local", "logging_level": logging.WARNING, "log_to_driver": False}
    if address in _LOCAL:  # a cluster that exists keeps its own settings
        args |= {"include_dashboard": False, "num_cpus": local.num_cpus, "_temp_dir": local.temp_dir}
        if local.object_store_mb:
            args["object_store_memory"] = local.object_store_mb << 20
    return args


@contextlib.contextmanager
def ray_session(address: str | None, *, local: LocalRay = LocalRay(),
                log: Callable[[str], None] = lambda m: None) -> Iterator[Any]:
    """Ray for one run: ``None``/``local`` starts one and shuts it down after; ``auto`` or
    ``ray://host:port`` joins a running cluster and leaves it running. A session
    this process already holds (a notebook, the tests) is used and left alone."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    # set before the start: the processes Ray starts read them from their environment
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's C++ core prints an error-level line for every actor Ray Data creates
    # (constructor arguments in the object store, ray-project/ray#53727): harmless
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    started = time.perf_counter()
    _init_quietly(ray, address, _start_args(address, local))
    what = "started a local Ray" if address in _LOCAL else f"connected to {address}"
    log(f"ray: {what} in {time.perf_counter() - started:.1f} s ({_describe(ray.cluster_resources())})")
    try:
        yield ray
    finally:
        ray.shutdown()


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)  # a RayTaskError carries the worker's own exception
    if isinstance(cause, BaseException) and cause is not exc:
        return _first_line(cause)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


@contextlib.contextmanager
def _data_settings(ray: Any) -> Iterator[None]:
    """Ray Data quiet for the run (the caller's bar is the one progress shown), restored after."""
    ctx = ray.data.DataContext.get_current()
    wanted = {"enable_progress_bars": False, "print_on_execution_start": False}
    saved = {k: getattr(ctx, k) for k in wanted if hasattr(ctx, k)}
    for k in saved:
        setattr(ctx, k, wanted[k])
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)


# --------------------------------------------------------------------------
# what runs on the workers (module level: Ray imports it there by name)
# --------------------------------------------------------------------------


def _row(job: Job) -> dict:
    """A job as a row: its name as given (for messages) and absolute paths (for workers elsewhere)."""
    outputs = {mode: os.path.abspath(path) for mode, path in job.outputs.items()}
    return {"source": job.source, "path": os.path.abspath(job.source), "kind": job.kind,
            "outputs": json.dumps(outputs)}


def _named(message: str, row: dict) -> str:
    """An error line that names the input as the user gave it, as the local path does."""
    message = message.replace(row["path"], row["source"])
    return message if row["source"] in message else f"{row['source']}: {message}"


def _pil_limits() -> None:
    """This process's PIL at the decoding limit of inference.py's own process (a driver and a Ray worker
    set no process up)."""
    from PIL import Image

    from modnet_npu.runtime.process_setup import MAX_IMAGE_PIXELS

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def _readable(images: Sequence[Job], pool: IoPool) -> tuple[list[Job], list[str], dict[str, tuple[int, int]]]:
    """The image jobs whose header reads, the error lines of those whose file cannot be read at all (found
    here, in the driver, in the decode task's own words: a re-run over a folder with a corrupt file starts
    no worker for it), and the readable ones' (height, width) by path, for the actors' shape plan."""
    _pil_limits()
    kept, errors, dims = [], [], {}
    for job, found in zip(images, pool.map(warmup.image_dimensions, [job.source for job in images]), strict=True):
        problem = "" if found is not None else _decode(_row(job))["error"]
        if problem:
            errors.append(problem)
        else:
            kept.append(job)
            if found is not None:
                dims[job.source] = found
    return kept, errors, dims


def _decode(row: dict) -> dict:
    """CPU task: read and decode one image; a file that cannot be read is an error row, not a failed block."""
    _pil_limits()
    _, rgb, problem = load_job(Job(row["path"], "image"))
    return {**row, "rgb": _EMPTY_RGB if rgb is None else rgb, "error": _named(problem, row) if problem else ""}


def _save(batch: dict[str, np.ndarray], *, background: str, decontaminate: bool = False) -> dict[str, np.ndarray]:
    """CPU task: render every mode of each image and write it atomically (``jobs.save_job``)."""
    errors = []
    for i, source in enumerate(batch["source"]):
        problem = str(batch["error"][i])
        if not problem:
            job = Job(str(source), "image", json.loads(str(batch["outputs"][i])))
            problem = save_job(job, batch["rgb"][i], batch["alpha"][i], background, decontaminate=decontaminate) or ""
        errors.append(_named(problem, {"source": str(source), "path": str(batch["path"][i])}) if problem else "")
    return {"source": batch["source"], "error": np.array(errors, dtype=object), "frames": np.zeros(len(errors), int),
            "note": batch["note"]}


def _objects(items: Sequence) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):  # one by one: equal shapes must not merge into one array
        out[i] = item
    return out


class _Actor:
    """Holds one Matter for the actor's life: the model is loaded once, on the device Ray gave it, and made
    ready for the shapes of the run (``warm``: the driver's ``warmup.ShapePlan``) before its first batch."""

    note = ""  # what the warm-up prepared and cost: returned once, with the first batch, for the driver to print

    def __init__(self, options: EngineOptions, *, warm: warmup.ShapePlan | None = None) -> None:
        from modnet_npu.matting.matter import Matter
        from modnet_npu.runtime.process_setup import setup_process

        settings = setup_process(threads=options.threads, defer_torch=True,  # ONNX Runtime needs no torch
                                 compile_cache_dir=compile_cache_dir(options.models_dir))
        self.options = options  # as received: every field, whole (tests compare them with the driver's)
        # the driver checked the model file (engines.check_model) before submitting: no repeat here
        self.matter = Matter(replace(options, threads=settings.threads), validate=False)
        # on a fast path made per shape (compiled, captured) every shape of the run is made now, and the set is
        # sealed: no batch waits for a compiler, and a shape outside the set runs eagerly
        self.note = warmup.prepare(self.matter, warm) or ""

    def _notes(self, rows: int) -> np.ndarray:
        """The warm-up's line on the first row of the first batch only, so the driver sees it once per actor."""
        notes = np.array([""] * rows, dtype=object)
        if rows:
            notes[0], self.note = self.note, ""
        return notes


class _ImageActor(_Actor):
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Mattes for a batch of decoded images; ``Matter.mattes`` infers those of one model size together."""
        from modnet_npu.matting.jobs import mattes_or_errors, size_problem

        errors = [str(e) for e in batch["error"]]
        alphas: list[np.ndarray] = [_EMPTY_ALPHA] * len(errors)
        loaded = []  # (row, job, rgb) of the images decoded and of a size the model takes
        for i in (i for i, e in enumerate(errors) if not e):
            job, rgb = Job(str(batch["source"][i]), "image"), batch["rgb"][i]
            errors[i] = size_problem(self.matter, job, rgb) or ""
            if not errors[i]:
                loaded.append((i, job, rgb))
        # the local path's rule: a batch the model fails on is retried image by image (jobs.mattes_or_errors)
        matted = mattes_or_errors(self.matter, [(job, rgb) for _, job, rgb in loaded]) if loaded else []
        for (i, _, _), (alpha, problem) in zip(loaded, matted, strict=True):
            alphas[i], errors[i] = (_EMPTY_ALPHA, problem) if alpha is None else (alpha, "")
        return {**batch, "alpha": _objects(alphas), "error": np.array(errors, dtype=object),
                "note": self._notes(len(errors))}


class _VideoActor(_Actor):
    def __init__(self, options: EngineOptions, *, background: str, batch: int, temporal: bool,
                 warm: warmup.ShapePlan | None = None, decontaminate: bool = False) -> None:
        super().__init__(options, warm=warm)
        self.video_args = (background, batch, temporal)  # self.options stays the EngineOptions, whole
        self.decontaminate = decontaminate

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A whole video (a batch of one row): every frame on this actor, in order."""
        from modnet_npu.matting.imaging import ImageReadError
        from modnet_npu.matting.video import process_video

        rows = [{k: batch[k][i] for k in ("source", "path", "outputs")} for i in range(len(batch["source"]))]
        errors, frames = [], []
        for row in rows:
            job = Job(str(row["path"]), "video", json.loads(str(row["outputs"])))
            try:
                frames.append(process_video(self.matter, job, *self.video_args, decontaminate=self.decontaminate))
                errors.append("")
            except (ImageReadError, ValueError, OSError) as exc:
                frames.append(0)
                errors.append(_named(str(exc), {"path": str(row["path"]), "source": str(row["source"])}))
        return {"source": batch["source"], "error": np.array(errors, dtype=object), "frames": np.array(frames),
                "note": self._notes(len(errors))}


# --------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------


def actor_options(options: EngineOptions, placement: Placement) -> EngineOptions:
    """What each actor opens: ``options`` whole, with the backend, device and threads the placement chose."""
    return replace(options, backend=placement.backend, device=placement.device, threads=placement.threads)


def shape_plans(jobs: Sequence[Job], options: EngineOptions, placement: Placement, batch: int, *,
                image_dims: Mapping[str, tuple[int, int]] | None = None) -> dict[str, warmup.ShapePlan | None]:
    """What the image and the video actors prepare before their first batch, by kind: the model input sizes
    the inputs' headers give under the size rule every actor applies (``warmup``), read once, here
    (``image_dims``: the images' (height, width) by path when the driver has read them already). None
    where the actors run ONNX Runtime or OpenVINO (nothing made per shape there) or have no input of the kind."""
    plans: dict[str, warmup.ShapePlan | None] = {"image": None, "video": None}
    if placement.backend != "torch":
        return plans
    known = {} if image_dims is None else {"image_dims": image_dims.get}
    with IoPool() as pool:
        for kind in plans:
            of_kind = [j for j in jobs if j.kind == kind]
            if of_kind:
                plans[kind] = warmup.shape_plan(of_kind, warmup.size_rule(options), batch, mapper=pool.map, **known)
    return plans


def _stage_args(placement: Placement, options: EngineOptions, count: int, batch: int,
                warm: warmup.ShapePlan | None = None) -> dict:
    """map_batches arguments of the inference stage: a fixed pool, fractional CPUs, one device each."""
    import ray.data

    size = max(1, min(placement.actors, math.ceil(count / batch)))  # no idle actors for a small job
    return {"compute": ray.data.ActorPoolStrategy(size=size),
            "fn_constructor_kwargs": {"options": actor_options(options, placement), "warm": warm},
            "num_cpus": ACTOR_CPUS, **placement.ray_args}


def _rows_per_task(count: int, cpus: float) -> int:
    """Images per decode or write task: about four tasks per CPU, at most 16 images each.

    A Ray task costs tens of milliseconds on a busy two-core machine, as much as
    decoding a small photo: one image per task made 64 images at 256 px 1.25x
    slower than eight per task. Four tasks per CPU keep every CPU fed to the end.
    """
    return max(1, min(16, math.ceil(count / max(1.0, 4 * cpus))))


def _image_rows(ray: Any, jobs: Sequence[Job], placement: Placement, options: EngineOptions, *, background: str,
                batch: int, env: dict, warm: warmup.ShapePlan | None = None,
                decontaminate: bool = False) -> Iterable[dict]:
    items = [_row(job) for job in jobs]
    per_task = _rows_per_task(len(items), ray.cluster_resources().get("CPU", 1))
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / per_task))
    ds = ds.map(_decode, num_cpus=TASK_CPUS, runtime_env=env)
    ds = ds.map_batches(_ImageActor, batch_size=batch, batch_format="numpy", runtime_env=env,
                        **_stage_args(placement, options, len(items), batch, warm))
    ds = ds.map_batches(_save, batch_size=per_task, batch_format="numpy",
                        fn_kwargs={"background": background, "decontaminate": decontaminate},
                        num_cpus=TASK_CPUS, runtime_env=env)
    return ds.iter_rows()


def _video_rows(ray: Any, jobs: Sequence[Job], placement: Placement, options: EngineOptions, *, background: str,
                batch: int, temporal: bool, env: dict, warm: warmup.ShapePlan | None = None,
                decontaminate: bool = False) -> Iterable[dict]:
    items = [_row(job) for job in jobs]
    args = _stage_args(placement, options, len(items), 1, warm)
    args["fn_constructor_kwargs"] |= {"background": background, "batch": batch, "temporal": temporal,
                                      "decontaminate": decontaminate}
    ds = ray.data.from_items(items, override_num_blocks=len(items))  # one video per block: spread over actors
    return ds.map_batches(_VideoActor, batch_size=1, batch_format="numpy", runtime_env=env, **args).iter_rows()


@dataclass(frozen=True)
class _Tally:
    done: int = 0
    failed: int = 0
    frames: int = 0


def _tally(rows: Iterable[dict], progress: Progress, tally: _Tally, note: Callable[[str], None]) -> _Tally:
    """Count the rows as they come; ``note`` gets the first warm-up line an actor returned (each actor of the
    pool prepares the same set: one line says it)."""
    done, failed, frames = tally.done, tally.failed, tally.frames
    noted = False
    for row in rows:
        if row.get("note") and not noted:
            noted = True
            note(str(row["note"]))
        if row["error"]:
            failed += 1
            progress.error(str(row["error"]))
        else:
            done += 1
            frames += int(row["frames"])
        progress.files(1)
    return _Tally(done, failed, frames)


def _remove_partials(jobs: Sequence[Job]) -> None:
    """Temporary files of writes a stopped run cut short (``fileio.atomic_path`` names them ``.<name>.*.part<ext>``)."""
    wanted: dict[str, set[tuple[str, str]]] = {}
    for job in jobs:
        for path in job.outputs.values():
            wanted.setdefault(os.path.dirname(os.path.abspath(path)), set()).add(temp_affixes(path))
    for folder, names in wanted.items():
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                if name.startswith(".") and any(name.startswith(b) and name.endswith(e) for b, e in names):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(folder, name))


def run_on_ray(jobs: Sequence[Job], *, options: EngineOptions, address: str | None = None, background: str = "white",
               batch: int = 1, temporal: bool = False, decontaminate: bool = False,
               progress: Progress | None = None, actors: int | None = None,
               local: LocalRay = LocalRay(), log: Callable[[str], None] = lambda m: None) -> RunSummary:
    """Run planned jobs (already reduced to what is still to do) on Ray: images, then videos.

    The same outputs, error lines and summary as ``jobs.run_jobs``; the time
    counted starts once Ray is up and includes the actors' start and model load.
    ``options.model`` is the model *file* the driver resolved (workers never
    download); every actor receives ``options`` whole (:func:`actor_options`).
    """
    progress = progress or Progress()
    if not jobs:
        return RunSummary(0, 0, 0, 0, 0, 0.0)
    videos = [j for j in jobs if j.kind == "video"]
    background = os.path.abspath(background) if os.path.isfile(background) else background
    from modnet_npu.runtime.engines import check_model

    check_model(options.model)  # the local path's check, here: a bad file is one line before any worker starts
    checked = time.perf_counter()
    with IoPool() as pool:
        images, unreadable, dims = _readable([j for j in jobs if j.kind == "image"], pool)
    for line in unreadable:
        progress.error(line)
        progress.files(1)
    if not images and not videos:  # nothing for a worker to do: no cluster is started or joined for it
        return RunSummary(0, len(unreadable), 0, len(unreadable), 0, time.perf_counter() - checked)
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)}}
    try:
        with ray_session(address, local=local, log=log) as ray:
            nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU"))
            placement = place(backend=options.backend, device=options.device, precision=options.precision,
                              cluster=ray.cluster_resources(), nodes=nodes, actors=actors, threads=options.threads)
            log(placement.describe())
            plans = shape_plans([*images, *videos], options, placement, batch, image_dims=dims)
            started = time.perf_counter()
            tally = _Tally(failed=len(unreadable))
            with _data_settings(ray):
                if images:
                    tally = _tally(_image_rows(ray, images, placement, options, background=background, batch=batch,
                                               env=env, warm=plans["image"], decontaminate=decontaminate),
                                   progress, tally, lambda line: log(f"ray: image actor warm-up: {line}"))
                if videos:
                    tally = _tally(_video_rows(ray, videos, placement, options, background=background, batch=batch,
                                               temporal=temporal, env=env, warm=plans["video"],
                                               decontaminate=decontaminate),
                                   progress, tally, lambda line: log(f"ray: video actor warm-up: {line}"))
    except KeyboardInterrupt:
        _remove_partials(jobs)  # after the shutdown above: no worker of ours is left to write
        raise
    except Exception as exc:
        ray_error = getattr(getattr(sys.modules.get("ray"), "exceptions", None), "RayError", ())
        if not isinstance(exc, ray_error):
            raise
        _remove_partials(jobs)
        raise ScaleoutError(f"the Ray run failed: {_first_line(exc)}") from None
    return RunSummary(tally.done, tally.failed, 0, len(images) + len(unreadable), tally.frames,
                      time.perf_counter() - started)
