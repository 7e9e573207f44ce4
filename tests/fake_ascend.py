"""Recording fakes of the Ascend routes' interfaces, for machines without CANN or an NPU.

Each imitates the real interface as read from its public source or binary,
and computes with ONNX Runtime on the CPU so parity can be checked for real:

* :class:`FakeOrtCann` — ``onnxruntime`` as the ``onnxruntime-cann`` 1.24.4
  wheel shows it: ``CANNExecutionProvider`` listed as available whether or
  not CANN is there; without CANN (``cann=False``) a session asking for it
  prints ONNX Runtime's own fallback lines (Python's to ``sys.stdout``, the
  C++ reason to file descriptor 2) and runs on the CPU, ``get_providers()``
  -> ``['CPUExecutionProvider']``; with ``cann=True`` an option key the
  1.24.4 provider does not know makes it fall back the same way
  (``Unknown provider option``), else the session reports
  ``['CANNExecutionProvider', 'CPUExecutionProvider']`` and the options.
  Every session's providers and options are recorded (``.sessions``).
* :func:`install_atc` — an ``atc`` executable (a Python script) for PATH that
  records its argv (``atc_calls``) and writes ``<--output>.om``: a JSON file
  naming the ONNX model and input shape, which the fake runtimes run.
  ``FAKE_ATC_MODE=fail`` makes it fail; ``old`` makes it refuse
  ``--precision_mode_v2`` as a toolkit older than that flag would. Its
  success and failure lines are ATC's well-known ones; failure details are
  the fake's own words (tests rely only on the exit status and the log).
* :class:`FakeAisBench` — ``ais_bench.infer.interface.InferSession(device_id,
  model_path)`` with ``get_inputs``, ``infer(feeds, mode="static")``,
  ``summary()`` (``sumary()`` with ``old=True``) whose ``exec_time_list`` is
  ``(start, end)`` pairs in ms (plain ms with ``old=True``), ``free_resource``.
* :class:`FakeAcl` — pyACL's calls as the pipeline uses them (``acl.init``,
  ``acl.rt.*``, ``acl.mdl.*``, data buffers), device memory simulated with
  host buffers; ``.calls`` records the sequence. ``repeat_init=True`` answers
  ``acl.init`` with ACL_ERROR_REPEAT_INITIALIZE, as when torch_npu set ACL up.

:func:`install_npu_smi` writes an ``npu-smi`` whose ``info`` prints a table
in the layout of npu-smi's ``info``.
"""
from __future__ import annotations

import ctypes
import json
import os
import stat
import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as _real_ort

CANN = "CANNExecutionProvider"
CPU = "CPUExecutionProvider"
# The provider option keys of onnxruntime-cann 1.24.4 (from its binary) and their defaults as it reports them.
CANN_OPTION_DEFAULTS = {
    "device_id": "0", "npu_mem_limit": str(2**64 - 1), "arena_extend_strategy": "kNextPowerOfTwo",
    "enable_cann_graph": "1", "enable_cann_subgraph": "0", "dump_graphs": "0", "dump_om_model": "1",
    "precision_mode": "", "op_select_impl_mode": "", "optypelist_for_implmode": "",
}
NO_ASCENDCL = ("Failed to load library {lib}/libonnxruntime_providers_cann.so with error: libascendcl.so: "
               "cannot open shared object file: No such file or directory")


def _fake_om(path: str) -> dict:
    with open(path) as fh:
        meta = json.load(fh)
    shape = tuple(int(d) for d in meta["input_shape"].split(":", 1)[1].split(","))
    return {**meta, "shape": shape}


# --------------------------------------------------------------------------
# onnxruntime-cann
# --------------------------------------------------------------------------


class FakeOrtCann:
    def __init__(self, *, cann: bool = False, option_keys: tuple[str, ...] = tuple(CANN_OPTION_DEFAULTS),
                 version: str = "1.24.4") -> None:
        self.cann, self.option_keys, self.version = cann, option_keys, version
        self.sessions: list[dict[str, Any]] = []
        self.runs = 0

    def __enter__(self) -> "FakeOrtCann":
        fake = self
        module = types.ModuleType("onnxruntime")
        module.__getattr__ = lambda name: getattr(_real_ort, name)  # SessionOptions, GraphOptimizationLevel ...
        module.__version__ = self.version
        module.__spec__, module.__file__ = _real_ort.__spec__, _real_ort.__file__  # importlib.util.find_spec asks
        module.get_available_providers = lambda: [CANN, CPU]  # listed whether or not CANN is installed

        class InferenceSession(_Session):
            owner = fake

        module.InferenceSession = InferenceSession
        self._saved = sys.modules.get("onnxruntime")
        sys.modules["onnxruntime"] = module
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is None:
            sys.modules.pop("onnxruntime", None)
        else:
            sys.modules["onnxruntime"] = self._saved


class _Session:
    owner: FakeOrtCann

    def __init__(self, model: Any, sess_options: Any = None, providers: Any = None, **kwargs: Any) -> None:
        providers = list(providers or [CPU])
        names = [p if isinstance(p, str) else p[0] for p in providers]
        given = {p[0]: dict(p[1]) for p in providers if not isinstance(p, str)}
        self.owner.sessions.append({"providers": names, "options": given})
        self._inner = _real_ort.InferenceSession(model, sess_options, providers=[CPU])
        self._providers, self._options = [CPU], {CPU: {}}
        if CANN in names:
            error = self._cann_error(given.get(CANN, {}))
            if error is None:
                self._providers = [CANN, CPU]
                self._options = {CANN: {**CANN_OPTION_DEFAULTS, **given.get(CANN, {})}, CPU: {}}
            else:
                self._fall_back(error, providers)

    def _cann_error(self, options: dict[str, str]) -> tuple[str, str] | None:
        """(Python's exception text, the C++ logger's line) of a failed provider, or None."""
        create_fail = ("onnxruntime_pybind_state.cc:1189 CreateExecutionProviderFactoryInstance "
                       "create CANN ExecutionProvider fail")
        if not self.owner.cann:
            lib = os.path.dirname(_real_ort.__file__) + "/capi"
            return create_fail, "[E:onnxruntime:Default, provider_bridge_ort.cc:2387 TryGetProviderInfo_CANN] " \
                + NO_ASCENDCL.format(lib=lib)
        unknown = [k for k in options if k not in self.owner.option_keys]
        if unknown:
            return f'[ONNXRuntimeError] : 1 : FAIL : Unknown provider option: "{unknown[0]}".', ""
        return None

    def _fall_back(self, error: tuple[str, str], providers: list) -> None:
        if error[1]:
            os.write(2, (error[1] + "\n").encode())
        print("*************** EP Error ***************")
        print(f"EP Error {error[0]} when using {providers}")
        print(f"Falling back to {[CPU]} and retrying.")
        print("****************************************")

    def get_providers(self) -> list[str]:
        return list(self._providers)

    def get_provider_options(self) -> dict:
        return {k: dict(v) for k, v in self._options.items()}

    def get_inputs(self) -> Any:
        return self._inner.get_inputs()

    def get_outputs(self) -> Any:
        return self._inner.get_outputs()

    def disable_fallback(self) -> None:
        self.fallback_disabled = True

    def get_provider_graph_assignment_info(self) -> list:
        nodes = [n for sub in self._inner.get_provider_graph_assignment_info() for n in sub.get_nodes()]
        return [SimpleNamespace(ep_name=self._providers[0], get_nodes=lambda: nodes)]

    def run(self, output_names: Any, feeds: dict, run_options: Any = None) -> list:
        self.owner.runs += 1
        return self._inner.run(output_names, feeds, run_options)


# --------------------------------------------------------------------------
# atc and npu-smi on PATH
# --------------------------------------------------------------------------

ATC_SCRIPT = r'''
import json, os, sys
here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "atc_calls.jsonl"), "a") as fh:
    fh.write(json.dumps(sys.argv[1:]) + "\n")
opts = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
mode = os.environ.get("FAKE_ATC_MODE", "ok")
print("ATC start working now, please wait for a moment.")
if mode == "fail":
    print("E10001: (fake) the model could not be parsed.")
    print("ATC run failed, Please check the detail log, Try 'atc --help' for more information")
    sys.exit(1)
if mode == "old" and "precision_mode_v2" in opts:
    print("E10001: (fake) unknown parameter [--precision_mode_v2].")
    print("ATC run failed, Please check the detail log, Try 'atc --help' for more information")
    sys.exit(1)
with open(opts["output"] + ".om", "w") as fh:
    json.dump({"model": opts["model"], "input_shape": opts["input_shape"], "soc_version": opts["soc_version"],
               "precision": opts.get("precision_mode_v2") or opts.get("precision_mode")}, fh)
print("ATC run success, welcome to the next use.")
'''

NPU_SMI_INFO = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 23.0.6                   Version: 23.0.6                                               |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B3               | OK            | 93.6        40                0    / 0             |
| 0                         | 0000:C1:00.0  | 0           0    / 0          3161 / 65536         |
+===========================+===============+====================================================+
"""


def _executable(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def install_atc(folder: Path) -> Path:
    """A recording ``atc`` in ``folder`` (put the folder on PATH)."""
    return _executable(folder, "atc", ATC_SCRIPT)


def atc_calls(folder: Path) -> list[list[str]]:
    record = folder / "atc_calls.jsonl"
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def install_npu_smi(folder: Path) -> Path:
    return _executable(folder, "npu-smi", f"import sys\nprint({NPU_SMI_INFO!r}, end='')\n")


# --------------------------------------------------------------------------
# ais_bench
# --------------------------------------------------------------------------


class FakeAisBench:
    def __init__(self, *, old: bool = False) -> None:
        self.old = old
        self.calls: list[tuple] = []

    def __enter__(self) -> "FakeAisBench":
        fake = self

        class InferSession(_InferSession):
            owner = fake

        names = ("ais_bench", "ais_bench.infer", "ais_bench.infer.interface")
        self._saved = {n: sys.modules.get(n) for n in names}
        pkg, infer, interface = (types.ModuleType(n) for n in names)
        pkg.infer, infer.interface, interface.InferSession = infer, interface, InferSession
        sys.modules.update(zip(names, (pkg, infer, interface)))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, module in self._saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class _InferSession:
    owner: FakeAisBench

    def __init__(self, device_id: int, model_path: str, acl_json_path: str | None = None, debug: bool = False,
                 loop: int = 1) -> None:
        self.om = _fake_om(model_path)
        self.owner.calls.append(("InferSession", device_id, model_path))
        self._ort = _real_ort.InferenceSession(self.om["model"], providers=[CPU])
        self._times: list = []
        if self.owner.old:
            self.sumary = self._summary
        else:
            self.summary = self._summary
            self.free_resource = lambda: self.owner.calls.append(("free_resource",))

    def get_inputs(self) -> list:
        return [SimpleNamespace(name=self.om["input_shape"].split(":")[0], shape=list(self.om["shape"]))]

    def infer(self, feeds: list, mode: str = "static", custom_sizes: int = 100000, out_array: bool = True) -> list:
        self.owner.calls.append(("infer", mode, tuple(feeds[0].shape)))
        if mode != "static" or tuple(feeds[0].shape) != self.om["shape"]:
            raise RuntimeError(f"input {tuple(feeds[0].shape)} does not fit the static model {self.om['shape']}")
        start = time.perf_counter() * 1000.0
        out = self._ort.run(None, {self._ort.get_inputs()[0].name: feeds[0]})
        end = time.perf_counter() * 1000.0
        self._times.append(end - start if self.owner.old else (start, end))
        return out

    def _summary(self) -> SimpleNamespace:
        return SimpleNamespace(exec_time_list=list(self._times))


# --------------------------------------------------------------------------
# pyACL
# --------------------------------------------------------------------------


class FakeAcl:
    def __init__(self, *, repeat_init: bool = False) -> None:
        self.repeat_init = repeat_init
        self.calls: list[str] = []
        self.memory: dict[int, ctypes.Array] = {}
        self.models: dict[int, dict] = {}

    def _record(self, name: str, result: Any = 0) -> Any:
        self.calls.append(name)
        return result

    def __enter__(self) -> "FakeAcl":
        self._saved = sys.modules.get("acl")
        sys.modules["acl"] = self._module()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is None:
            sys.modules.pop("acl", None)
        else:
            sys.modules["acl"] = self._saved

    def _module(self) -> types.ModuleType:
        r = self._record
        acl = types.ModuleType("acl")
        acl.init = lambda: r("init", 100002 if self.repeat_init else 0)
        acl.finalize = lambda: r("finalize")
        acl.create_data_buffer = lambda ptr, size: r("create_data_buffer", ("buffer", ptr, size))
        acl.destroy_data_buffer = lambda buf: r("destroy_data_buffer")
        acl.rt = SimpleNamespace(set_device=lambda i: r("rt.set_device"), reset_device=lambda i: r("rt.reset_device"),
                                 malloc=self._malloc, free=self._free,
                                 memcpy=self._memcpy)
        acl.mdl = SimpleNamespace(
            load_from_file=self._load, create_desc=lambda: r("mdl.create_desc", {}),
            get_desc=lambda desc, mid: r("mdl.get_desc", desc.update(self.models[mid]) or 0),
            get_input_size_by_index=lambda desc, i: r("mdl.get_input_size_by_index", desc["in_size"]),
            get_output_size_by_index=lambda desc, i: r("mdl.get_output_size_by_index", desc["out_size"]),
            get_output_dims=lambda desc, i: r("mdl.get_output_dims", ({"dims": list(desc["out_shape"])}, 0)),
            get_output_data_type=lambda desc, i: r("mdl.get_output_data_type", 0),
            create_dataset=lambda: r("mdl.create_dataset", []),
            add_dataset_buffer=lambda ds, buf: r("mdl.add_dataset_buffer", (ds.append(buf), 0)),
            execute=self._execute, unload=lambda mid: r("mdl.unload"),
            destroy_desc=lambda d: r("mdl.destroy_desc"), destroy_dataset=lambda d: r("mdl.destroy_dataset"))
        return acl

    def _load(self, path: str) -> tuple[int, int]:
        om = _fake_om(path)
        sess = _real_ort.InferenceSession(om["model"], providers=[CPU])
        n, _, h, w = om["shape"]
        mid = len(self.models) + 1
        self.models[mid] = {"sess": sess, "in_shape": om["shape"], "in_size": 4 * n * 3 * h * w,
                            "out_shape": (n, 1, h, w), "out_size": 4 * n * h * w}
        return self._record("mdl.load_from_file", (mid, 0))

    def _malloc(self, size: int, policy: int) -> tuple[int, int]:
        buf = (ctypes.c_char * size)()
        self.memory[ctypes.addressof(buf)] = buf
        return self._record("rt.malloc", (ctypes.addressof(buf), 0))

    def _free(self, ptr: int) -> int:
        del self.memory[ptr]
        return self._record("rt.free")

    def _memcpy(self, dst: int, dst_max: int, src: int, count: int, kind: int) -> int:
        assert count <= dst_max and kind in (1, 2), (count, dst_max, kind)
        assert (dst if kind == 1 else src) in self.memory, "the device side must be device memory"
        ctypes.memmove(dst, src, count)
        return self._record(f"rt.memcpy({'H2D' if kind == 1 else 'D2H'})")

    def _execute(self, mid: int, inputs: list, outputs: list) -> int:
        m = self.models[mid]
        (_, in_ptr, in_size), (_, out_ptr, out_size) = inputs[0], outputs[0]
        x = np.frombuffer(ctypes.string_at(in_ptr, in_size), np.float32).reshape(m["in_shape"])
        y = np.ascontiguousarray(m["sess"].run(None, {m["sess"].get_inputs()[0].name: x})[0], np.float32)
        ctypes.memmove(out_ptr, y.ctypes.data, out_size)
        return self._record("mdl.execute")
