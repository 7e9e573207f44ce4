"""The engine options: one torch-free type, one argparse group, one device parser, one backend choice."""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from conftest import ROOT
from modnet_npu.errors import UsageError
from modnet_npu.matting.imaging import ShortSide
from modnet_npu.runtime import options as engine_options
from modnet_npu.runtime.options import (DeviceSpec, EngineOptions, add_engine_arguments, choose_engine,
                                        engine_options_from, parse_device)


def test_options_constants_and_imaging_import_without_torch():
    code = ("import sys\n"
            "import modnet_npu.runtime.options, modnet_npu.matting.imaging, modnet_npu.model.contract\n"
            "import modnet_npu.model.precision, modnet_npu.matting.codec\n"
            "o = modnet_npu.runtime.options.EngineOptions(size='512', device='npu:1', precision='bf16')\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
            "print(o.size)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ShortSide(pixels=512)"


def test_the_size_contract_has_one_home():
    from modnet_npu.matting import imaging
    from modnet_npu.model import contract, modnet

    assert modnet.SIZE_MULTIPLE is contract.SIZE_MULTIPLE == 32
    assert imaging.SIZE_MULTIPLE is contract.SIZE_MULTIPLE and imaging.MAX_MODEL_SIDE is contract.MAX_MODEL_SIDE


def test_options_are_frozen_and_keyword_only():
    options = EngineOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.threads = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        EngineOptions("model.onnx")  # type: ignore[misc]


@pytest.mark.parametrize("size,max_side,expect", [
    ("auto", 4096, "auto"),
    (512, 4096, ShortSide(512)),
    ("512", 4096, ShortSide(512)),
    (ShortSide(64), 4096, ShortSide(64)),
    ("256x320", 4096, (256, 320)),
    ((256, 320), 4096, (256, 320)),
    ("32x4160", 5000, (32, 4160)),
])
def test_every_way_of_giving_a_size_is_parsed_once(size, max_side, expect):
    assert EngineOptions(size=size, max_side=max_side).size == expect


@pytest.mark.parametrize("fields,expect", [
    ({"threads": -1}, "--threads must be 0 (automatic) or more, got -1"),
    ({"max_side": 16}, "--max-side must be at least 32, got 16"),
    ({"size": "abc"}, "size must be auto, N (short side) or HxW, got 'abc'"),
    ({"size": 10}, "out of range"),
    ({"size": "32x4160"}, "out of range: each side must be 32..4096 pixels"),
    ({"size": (256, 100)}, "multiples of 32"),
    ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"device": "cpu:1"}, "unknown device"),
    ({"backend": "tensorrt"}, "--backend: 'tensorrt' is not one of auto, torch, ort"),
    ({"precision": "int8"}, "--precision: 'int8'"),
    ({"graphs": "maybe"}, "--graphs: 'maybe'"),
    ({"model_form": "fast"}, "--model-form: 'fast'"),
    ({"backend": "ort", "device": "cuda:1"}, "the ort backend runs on the CPU; --device cuda:1 needs --backend torch"),
    ({"backend": "ort", "precision": "fp16"}, "--precision fp16 needs --backend torch"),
    ({"model": " "}, "--model must not be empty"),
])
def test_a_bad_value_is_a_usage_error_naming_it(fields, expect):
    with pytest.raises(UsageError) as err:
        EngineOptions(**fields)
    assert expect in str(err.value)


@pytest.mark.parametrize("spec,expect", [
    ("auto", DeviceSpec("auto")), ("CPU", DeviceSpec("cpu")), ("mps", DeviceSpec("mps")),
    ("npu", DeviceSpec("npu")), ("npu:3", DeviceSpec("npu", 3)), (" cuda:0 ", DeviceSpec("cuda", 0)),
])
def test_device_strings(spec, expect):
    assert parse_device(spec) == expect


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "npu:-1", "", "mps:0", "auto:1"])
def test_device_strings_refused(spec):
    with pytest.raises(UsageError, match="unknown device"):
        parse_device(spec)


def test_the_backend_choice_asks_for_accelerators_only_when_auto_needs_them():
    asked = []

    def finder(kind: str):
        def find():
            asked.append(kind)
            return kind, f"found {kind}"
        return find

    assert choose_engine("ort", "auto", "fp32", find_accelerator=finder("npu")).backend == "ort"
    choice = choose_engine("auto", "cuda:1", "fp16", find_accelerator=finder("npu"))
    assert (choice.backend, choice.device, choice.why) == ("torch", DeviceSpec("cuda", 1), "device cuda:1 asked for")
    assert asked == []
    choice = choose_engine("auto", "auto", "fp32", find_accelerator=finder("cpu"))
    assert choice.backend == "ort" and choice.why == "found cpu: ONNX Runtime is the faster engine on a CPU"
    choice = choose_engine("auto", "auto", "fp32", find_accelerator=finder("npu"))
    assert (choice.backend, choice.device, choice.why) == ("torch", DeviceSpec("npu"), "found npu")
    with pytest.raises(UsageError, match="--precision bf16 needs --backend torch"):  # auto chose ONNX Runtime
        choose_engine("auto", "auto", "bf16", find_accelerator=finder("cpu"))
    assert asked == ["cpu", "npu", "cpu"]


def _parser(**kwargs) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_engine_arguments(p, **kwargs)
    return p


def test_the_group_has_an_option_for_every_field_and_its_defaults_are_the_types():
    p = _parser()
    dests = {a.dest for a in p._actions} - {"help"}
    assert dests == {f.name for f in dataclasses.fields(EngineOptions)}
    assert engine_options_from(p.parse_args([])) == EngineOptions()


def test_the_group_parses_every_field():
    args = _parser().parse_args([
        "--model", "m.onnx", "--sha256", "ab" * 32, "--models-dir", "cache", "--offline", "--allow-synthetic",
        "--backend", "torch", "--device", "npu:1", "--precision", "fp16", "--model-form", "faithful",
        "--size", "64x96", "--max-side", "5000", "--threads", "3", "--compile", "--graphs", "off", "--strict-fp32"])
    assert engine_options_from(args) == EngineOptions(
        model="m.onnx", sha256="ab" * 32, models_dir="cache", offline=True, allow_synthetic=True, backend="torch",
        device="npu:1", precision="fp16", model_form="faithful", size=(64, 96), max_side=5000, threads=3,
        compile=True, graphs="off", strict_fp32=True)


def test_omitted_fields_come_from_the_base_and_defaults_from_the_tool():
    tool = EngineOptions(backend="torch", device="cpu")
    p = _parser(omit=("size", "strict_fp32"), defaults=tool)
    p.add_argument("--size", default=None)  # a tool's own --size, not the engine's
    args = p.parse_args(["--size", "anything"])
    options = engine_options_from(args, base=EngineOptions(strict_fp32=True))
    assert (options.backend, options.device, options.size, options.strict_fp32) == ("torch", "cpu", "auto", True)
    with pytest.raises(ValueError, match="not engine options: speed"):
        _parser(omit=("speed",))


def test_matter_takes_the_options_or_keywords_not_positions():
    from modnet_npu.matting.matter import Matter

    with pytest.raises(TypeError, match="keyword arguments"):
        Matter("model.onnx")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Matter(EngineOptions(), speed=3)
    with pytest.raises(UsageError, match="--threads"):
        Matter(threads=-2)


def test_threads_0_means_the_free_cpus_in_the_engines_too(monkeypatch):
    """One policy: an engine given 0 threads asks process_setup (the CPUs free now), not os.cpu_count()."""
    from modnet_npu.runtime import engines, process_setup

    assert "0 = automatic: the CPUs other processes leave free" in engine_options.THREADS_HELP
    monkeypatch.setattr(process_setup, "free_cpus", lambda interval_s=0.3: 1)  # a machine whose other CPUs are busy
    monkeypatch.setattr(process_setup, "usable_cpus", lambda: 64)
    assert engines.default_threads(0) == 1
    assert engines.default_threads(3) == 3 and engines.default_threads(1000) == 64  # clamped to the CPUs
