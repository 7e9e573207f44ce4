"""The Ascend routes (modnet_npu.routes) against recording fakes of their real interfaces (tests/fake_ascend.py).

No Ascend hardware here: what is checked is what the project asks of each
interface (the provider options, ATC's argv, the runtimes' calls), the cache,
the silent-fallback check, and that a route that cannot run is one line and a
non-zero exit with nothing timed. One test runs against a real
``onnxruntime-cann`` where the environment has one.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import run_npu_inference as rni
from fake_ascend import CANN_OPTION_DEFAULTS, FakeAcl, FakeAisBench, FakeOrtCann, atc_calls, install_atc
from fake_ascend import install_npu_smi
from modnet_npu.routes import RouteFailedError, RouteUnavailableError, parse_routes, plan_routes
from modnet_npu.routes.atc import compile_om, resolve_soc, soc_from_npu_smi
from modnet_npu.routes.om import OmRoute, compile_all
from modnet_npu.routes.ort_cann import NATIVE_MODE, OrtCannRoute

SIZE = (256, 256)  # the webnn flavour's static input
SHAPE = (1, 3, *SIZE)
FAST = ["--runs", "2", "--warmup", "0", "--batch-sizes", "1"]


def _real_cann_listed() -> bool:
    import onnxruntime

    return "CANNExecutionProvider" in onnxruntime.get_available_providers()


@pytest.fixture
def bin_dir(tmp_path, monkeypatch) -> Path:
    """A folder first on PATH, holding the recording atc."""
    folder = tmp_path / "bin"
    install_atc(folder)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder


@pytest.fixture
def no_om_runtime(monkeypatch):
    for name in ("ais_bench", "ais_bench.infer", "ais_bench.infer.interface", "acl"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails as where neither is installed


def _main(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = rni.main(args)
    return code, out.getvalue(), err.getvalue()


def _compile(atc: Path, model: str, cache: Path, **kw):
    args = {"atc": str(atc), "model": model, "model_sha256": "ab" * 32, "input_name": "input", "shape": SHAPE,
            "soc_version": "Ascend910B3", "precision": "fp32", "cache_dir": str(cache)} | kw
    return compile_om(**args)


# --------------------------------------------------------------------------
# choosing routes
# --------------------------------------------------------------------------


def test_routes_are_parsed_in_order_once_and_unknown_ones_refused():
    assert parse_routes("om, torch,om") == ("om", "torch")
    with pytest.raises(ValueError, match="unknown route 'cuda'"):
        parse_routes("torch,cuda")
    assert not plan_routes("torch").active  # the default: the run as it always was


def test_an_unknown_route_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        rni.main(["--routes", "torch,tensorrt"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "unknown route 'tensorrt'" in err


# --------------------------------------------------------------------------
# ort-cann
# --------------------------------------------------------------------------


@pytest.mark.skipif(_real_cann_listed(), reason="this onnxruntime has the CANN provider")
def test_plain_onnxruntime_is_one_line_naming_onnxruntime_cann(tmp_path, webnn_file):
    out = tmp_path / "out"
    code, text, err = _main(["--routes", "ort-cann", "--model", webnn_file, "--output-dir", str(out), *FAST])
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ort-cann: ")
    assert "has no CANNExecutionProvider" in err and "onnxruntime-cann" in err
    assert not out.exists() and "Parity" not in text  # stopped before anything was run or written


def test_cann_provider_without_cann_falls_back_and_is_refused(tmp_path, webnn_file, capfd):
    out = tmp_path / "out"
    with FakeOrtCann(cann=False) as ort:
        code, text, err = _main(["--routes", "torch,ort-cann", "--model", webnn_file, "--output-dir", str(out),
                                 *FAST])
    assert code == 1 and err.count("\n") == 1
    assert "the CANN execution provider is not in use: ONNX Runtime fell back to the CPU" in err
    assert "['CPUExecutionProvider']" in err and "libascendcl.so" in err  # the reason ONNX Runtime gave
    assert not out.exists() and "Parity" not in text and "Benchmark" not in text  # nothing timed
    assert "route torch" not in text  # refused before the torch route's first call
    cann = [s for s in ort.sessions if "CANNExecutionProvider" in s["providers"]]
    assert len(cann) == 1  # a missing library is not a renamed option: no second attempt
    assert cann[0]["options"]["CANNExecutionProvider"] == {
        "device_id": "0", "dump_om_model": "0", "precision_mode": "must_keep_origin_dtype"}
    assert "EP Error" not in capfd.readouterr().out  # ONNX Runtime's own lines were caught, not shown


def test_ort_cann_options_are_keys_the_provider_knows(webnn_file):
    with FakeOrtCann(cann=True) as ort:
        route = OrtCannRoute(webnn_file, device_id=1, precision="fp32", shape=SHAPE)
        setup = route.setup()
    assert set(ort.sessions[0]["options"]["CANNExecutionProvider"]) <= set(CANN_OPTION_DEFAULTS)
    assert setup.precision_mode == "precision_mode=must_keep_origin_dtype" and setup.device == "npu:1"
    assert setup.options["in_force"]["dump_om_model"] == "0"  # read back from the session
    assert setup.options["nodes_by_provider"]["CANNExecutionProvider"] > 0
    assert route.first_run().first_call_ms > 0 and route.session.fallback_disabled


def test_ort_cann_native_precision_passes_no_mode(webnn_file):
    with FakeOrtCann(cann=True) as ort:
        setup = OrtCannRoute(webnn_file, device_id=0, precision="native", shape=SHAPE).setup()
    assert "precision_mode" not in ort.sessions[0]["options"]["CANNExecutionProvider"]
    assert setup.precision == "native" and setup.precision_mode == NATIVE_MODE


def test_ort_cann_renamed_precision_key_is_tried_second(webnn_file):
    keys = tuple(k for k in CANN_OPTION_DEFAULTS if k != "precision_mode") + ("precision_mode_v2",)
    with FakeOrtCann(cann=True, option_keys=keys) as ort:
        setup = OrtCannRoute(webnn_file, device_id=0, precision="fp32", shape=SHAPE).setup()
    tried = [s["options"]["CANNExecutionProvider"] for s in ort.sessions]
    assert [("precision_mode" in t, t.get("precision_mode_v2")) for t in tried] == [(True, None), (False, "origin")]
    assert setup.precision_mode == "precision_mode_v2=origin"


@pytest.mark.skipif(not _real_cann_listed(), reason="needs onnxruntime-cann installed (it lists "
                    "CANNExecutionProvider); see docs/ASCEND.md for the separate environment")
def test_real_onnxruntime_cann(webnn_file, portrait_input):
    """With CANN and an NPU the route runs and matches ONNX Runtime CPU; without, the fallback is caught."""
    import onnxruntime

    try:
        route = OrtCannRoute(webnn_file, device_id=0, precision="fp32", shape=SHAPE)
    except RouteUnavailableError as exc:
        assert "fell back to the CPU (get_providers() = ['CPUExecutionProvider'])" in str(exc)
        return
    ref = onnxruntime.InferenceSession(webnn_file, providers=["CPUExecutionProvider"])
    expected = ref.run(None, {ref.get_inputs()[0].name: portrait_input})[0][:, 0]
    assert np.abs(route.infer(portrait_input) - expected).max() < 5e-2


# --------------------------------------------------------------------------
# ATC and its cache
# --------------------------------------------------------------------------


def test_atc_argv_and_cache(bin_dir, tmp_path, webnn_file):
    cache = tmp_path / "cache"
    first = _compile(bin_dir / "atc", webnn_file, cache)
    argv = atc_calls(bin_dir)[0]
    assert {"--framework=5", "--soc_version=Ascend910B3", "--input_shape=input:1,3,256,256", "--input_format=NCHW",
            "--precision_mode_v2=origin", f"--model={os.path.abspath(webnn_file)}"} <= set(argv)
    assert not first.cached and os.path.isfile(first.om_path) and os.path.dirname(first.log_path) == \
        os.path.dirname(first.om_path) and "ATC run success" in Path(first.log_path).read_text()
    again = _compile(bin_dir / "atc", webnn_file, cache)
    assert again.cached and again.om_path == first.om_path and len(atc_calls(bin_dir)) == 1
    _compile(bin_dir / "atc", webnn_file, cache, soc_version="Ascend310P3")  # another chip: another .om
    native = _compile(bin_dir / "atc", webnn_file, cache, precision="native")  # another precision too
    calls = atc_calls(bin_dir)
    assert len(calls) == 3 and "--soc_version=Ascend310P3" in calls[1]
    assert not any("precision_mode" in a for a in calls[2]) and native.precision_flag is None
    assert _compile(bin_dir / "atc", webnn_file, cache, model_sha256="cd" * 32).cached is False  # another model


def test_atc_failure_is_one_line_with_its_log(bin_dir, tmp_path, webnn_file, monkeypatch):
    monkeypatch.setenv("FAKE_ATC_MODE", "fail")
    with pytest.raises(RouteFailedError) as exc:
        _compile(bin_dir / "atc", webnn_file, tmp_path / "cache")
    message = str(exc.value)
    log = message.rsplit("its log: ", 1)[1]
    assert "\n" not in message and message.startswith("om: ATC failed (exit 1): E10001")
    assert os.path.isfile(log) and "ATC run failed" in Path(log).read_text()
    assert not list(Path(log).parent.glob("*.om")) and not (Path(log).parent / "meta.json").exists()
    monkeypatch.setenv("FAKE_ATC_MODE", "ok")
    assert not _compile(bin_dir / "atc", webnn_file, tmp_path / "cache").cached  # the failure was not cached


def test_an_older_atc_gets_the_older_fp32_flag(bin_dir, tmp_path, webnn_file, monkeypatch):
    monkeypatch.setenv("FAKE_ATC_MODE", "old")
    done = _compile(bin_dir / "atc", webnn_file, tmp_path / "cache")
    calls = atc_calls(bin_dir)
    assert [c[-1] for c in calls] == ["--precision_mode_v2=origin", "--precision_mode=must_keep_origin_dtype"]
    assert done.precision_flag == "--precision_mode=must_keep_origin_dtype"
    assert Path(done.log_path).read_text().count("$ ") == 2  # both attempts kept in the log


def test_no_atc_on_path_is_one_line(tmp_path, webnn_file, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _, err = _main(["--routes", "om", "--soc-version", "Ascend910B3", "--model", webnn_file,
                          "--output-dir", str(tmp_path / "o"), *FAST])
    assert code == 1 and err.count("\n") == 1 and "om: ATC (atc) is not on PATH" in err


def test_the_chip_comes_from_npu_smi_or_must_be_given(bin_dir):
    assert soc_from_npu_smi("| 1     310P3               | OK            | 1.0 |", 1) == "Ascend310P3"
    with pytest.raises(RouteUnavailableError, match="pass --soc-version"):
        resolve_soc(None, 0)  # neither torch_npu nor npu-smi here
    install_npu_smi(bin_dir)
    assert resolve_soc(None, 0) == ("Ascend910B3", "npu-smi info")
    assert resolve_soc("Ascend910B4", 0) == ("Ascend910B4", "--soc-version")


# --------------------------------------------------------------------------
# the OM runtimes
# --------------------------------------------------------------------------


def test_om_without_a_runtime_compiles_then_is_one_line(bin_dir, tmp_path, webnn_file, no_om_runtime):
    models = tmp_path / "models"
    code, text, err = _main(["--routes", "om", "--soc-version", "Ascend910B3", "--model", webnn_file,
                             "--models-dir", str(models), "--output-dir", str(tmp_path / "o"), *FAST])
    argv = atc_calls(bin_dir)[0]
    assert {"--framework=5", "--soc_version=Ascend910B3", "--input_shape=input:1,3,256,256",
            "--precision_mode_v2=origin"} <= set(argv)
    assert code == 1 and err.count("\n") == 1 and "om: no OM runtime" in err
    assert "ais_bench" in err and "acl" in err and str(models / ".om-cache") in err  # the .om is kept
    assert not (tmp_path / "o").exists() and "Benchmark" not in text


def test_acl_runtime_call_sequence(bin_dir, tmp_path, webnn_file, portrait_input):
    compiled = compile_all([SIZE], atc=str(bin_dir / "atc"), model=webnn_file, model_sha256="ab" * 32,
                           input_name="input", soc_version="Ascend910B3", precision="fp32",
                           cache_dir=str(tmp_path))
    import onnxruntime

    ref = onnxruntime.InferenceSession(webnn_file, providers=["CPUExecutionProvider"])
    expected = ref.run(None, {"input": portrait_input})[0][:, 0]
    for repeat, owned in ((False, True), (True, False)):
        with FakeAcl(repeat_init=repeat) as acl:
            route = OmRoute(compiled, runtime="acl", device_id=0, precision="fp32", benchmark_size=SIZE)
            assert np.array_equal(route.infer(portrait_input), expected)  # the bytes went there and back intact
            route.close()
        calls = acl.calls
        run = calls.index("mdl.execute")
        assert calls[:3] == ["init", "rt.set_device", "mdl.load_from_file"] and calls[run - 1] == "rt.memcpy(H2D)"
        assert calls[run + 1] == "rt.memcpy(D2H)" and calls.count("rt.malloc") == calls.count("rt.free") == 2
        assert ("finalize" in calls) is owned and ("rt.reset_device" in calls) is owned  # never under torch_npu


@pytest.mark.parametrize("old", [False, True])
def test_ais_bench_device_times_either_spelling(bin_dir, tmp_path, webnn_file, old):
    compiled = compile_all([SIZE], atc=str(bin_dir / "atc"), model=webnn_file, model_sha256="ab" * 32,
                           input_name="input", soc_version="Ascend910B3", precision="fp32",
                           cache_dir=str(tmp_path))
    with FakeAisBench(old=old) as ais:
        route = OmRoute(compiled, runtime="ais_bench", device_id=2, precision="fp32", benchmark_size=SIZE)
        route.infer(np.zeros((2, 3, *SIZE), np.float32))  # batch 2 on a batch-1 .om: one by one
        times = route.device_times_ms(3)
        route.close()
    assert ais.calls[0][:2] == ("InferSession", 2)
    assert [c[1:] for c in ais.calls if c[0] == "infer"] == [("static", SHAPE)] * 3
    assert len(times) == 3 and all(t > 0 for t in times)
    assert (("free_resource",) in ais.calls) is not old


# --------------------------------------------------------------------------
# all three, side by side, through the command
# --------------------------------------------------------------------------


def test_three_routes_side_by_side(bin_dir, tmp_path, webnn_file):
    out, models = tmp_path / "out", tmp_path / "models"
    with FakeOrtCann(cann=True), FakeAisBench():
        code, text, err = _main(["--routes", "torch,ort-cann,om", "--soc-version", "Ascend910B3",
                                 "--model", webnn_file, "--models-dir", str(models), "--output-dir", str(out),
                                 *FAST])
    assert code == 0, err
    report = json.loads((out / "evaluation_report.json").read_text())
    routes = report["routes"]["routes"]
    assert list(routes) == ["torch", "ort-cann", "om"] and report["routes"]["runs"] == 2
    for name, r in routes.items():
        assert r["parity"]["passed"] and r["parity"]["max_error"] < 1e-4, name
        assert r["latency"]["runs"] == 2 and r["first_run"]["first_call_ms"] > 0, name
        assert r["setup"]["precision"] == "fp32", name
    assert routes["ort-cann"]["setup"]["precision_mode"] == "precision_mode=must_keep_origin_dtype"
    assert routes["om"]["setup"]["precision_mode"] == "precision_mode_v2=origin"
    assert routes["om"]["first_run"]["atc_cached"] is False and routes["om"]["device_exec_ms"]["runs"] == 2
    assert any("GE initialises once per process" in n for n in report["routes"]["notes"])
    assert "routes.png" in report["outputs"] and (out / "routes.png").exists()
    assert "| ort-cann" in text and "| om" in text and "vs ORT CPU" in text
