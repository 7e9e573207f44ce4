"""The ``om`` route: the ONNX file compiled by ATC (:mod:`~modnet_npu.routes.atc`), run by ais_bench or ACL.

Runtimes, in the order tried:

* **ais_bench** (with its ``aclruntime`` extension; installed from Ascend's
  tools repository, not the package index): ``InferSession(device_id,
  model_path)``, ``.infer([x], mode="static")`` -> a list of numpy arrays;
  the device's own execution times are in ``.summary().exec_time_list``
  (spelled ``sumary`` in older releases), milliseconds, or ``(start, end)``
  pairs in milliseconds in newer ones.
* **ACL** (``import acl``, pyACL, part of CANN): ``acl.init``,
  ``acl.rt.set_device``, ``acl.mdl.load_from_file``, a model description,
  device buffers in input/output datasets, and per call
  ``acl.rt.memcpy`` (host to device) -> ``acl.mdl.execute`` ->
  ``acl.rt.memcpy`` (device to host).

An .om is compiled for one input shape: the route holds one per parity size.
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np

from modnet_npu.cli import one_line
from modnet_npu.routes.atc import NATIVE_MODE, Compiled
from modnet_npu.routes.base import FirstRun, RouteFailedError, RouteSetup, RouteUnavailableError
from modnet_npu.routes.output import version_of

RUNTIME_HINT = ("install ais_bench and aclruntime from Ascend's tools repository "
                "(https://gitee.com/ascend/tools, ais-bench_workload), or source CANN's set_env.sh so that "
                "ACL's Python API (import acl) is found")


def find_runtime(compiled: str | None = None) -> str:
    """``"ais_bench"`` or ``"acl"``, whichever imports; RouteUnavailableError naming both otherwise."""
    why = []
    try:
        from ais_bench.infer.interface import InferSession  # noqa: F401

        return "ais_bench"
    except (ImportError, OSError) as exc:  # OSError: aclruntime present but CANN's libraries not found
        why.append(f"ais_bench: {one_line(str(exc) or type(exc).__name__, 120)}")
    try:
        import acl  # noqa: F401

        return "acl"
    except (ImportError, OSError) as exc:
        why.append(f"acl: {one_line(str(exc) or type(exc).__name__, 120)}")
    kept = f"; the compiled model is kept at {compiled}" if compiled else ""
    raise RouteUnavailableError(f"om: no OM runtime to run the .om ({'; '.join(why)}); {RUNTIME_HINT}{kept}")


class AisBenchRuntime:
    """One .om through ais_bench's ``InferSession`` (static shape)."""

    kind = "ais_bench"

    def __init__(self, om_path: str, device_id: int) -> None:
        from ais_bench.infer.interface import InferSession

        self.session = InferSession(device_id, om_path)

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.infer([np.ascontiguousarray(x, np.float32)], mode="static")[0])

    def device_times_ms(self) -> list[float]:
        """Every execution's device time so far, ms, as the runtime measured it."""
        summary = getattr(self.session, "summary", None) or self.session.sumary
        times = []
        for t in summary().exec_time_list:
            times.append(float(t[1]) - float(t[0]) if isinstance(t, (tuple, list)) else float(t))
        return times

    @staticmethod
    def versions() -> dict[str, str | None]:
        return {"ais_bench": version_of("ais_bench"), "aclruntime": version_of("aclruntime")}

    def close(self) -> None:
        free = getattr(self.session, "free_resource", None)  # newer releases; finalize() would reset every device
        if free is not None:
            free()


# ACL's constants (acl_base.h / acl_rt.h / acl_mdl.h)
ACL_SUCCESS = 0
ACL_ERROR_REPEAT_INITIALIZE = 100002  # ACL already initialised in this process (by torch_npu, say)
ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEMCPY_HOST_TO_DEVICE = 1
ACL_MEMCPY_DEVICE_TO_HOST = 2
ACL_DTYPES = {0: np.float32, 1: np.float16}  # ACL_FLOAT, ACL_FLOAT16


class AclRuntime:
    """One .om through pyACL: load, one input and one output buffer on the device, copy-execute-copy."""

    kind = "acl"

    def __init__(self, om_path: str, device_id: int) -> None:
        import acl

        self.acl, self.device_id, self.owned = acl, device_id, False
        self.buffers: list[tuple[Any, Any]] = []  # (device pointer, data buffer)
        ret = acl.init()
        if ret not in (ACL_SUCCESS, ACL_ERROR_REPEAT_INITIALIZE):
            raise RouteFailedError(f"om: acl.init failed (ACL error {ret})")
        self.owned = ret == ACL_SUCCESS  # ours to finalise; else another part of the process set ACL up
        self._check(acl.rt.set_device(device_id), "acl.rt.set_device")
        self.model_id, ret = acl.mdl.load_from_file(om_path)
        self._check(ret, "acl.mdl.load_from_file")
        self.desc = acl.mdl.create_desc()
        self._check(acl.mdl.get_desc(self.desc, self.model_id), "acl.mdl.get_desc")
        self.in_size = acl.mdl.get_input_size_by_index(self.desc, 0)
        self.out_size = acl.mdl.get_output_size_by_index(self.desc, 0)
        dims, ret = acl.mdl.get_output_dims(self.desc, 0)
        self._check(ret, "acl.mdl.get_output_dims")
        self.out_shape = tuple(int(d) for d in dims["dims"])
        self.out_dtype = ACL_DTYPES.get(acl.mdl.get_output_data_type(self.desc, 0), np.float32)
        self.inputs, self.in_ptr = self._dataset(self.in_size)
        self.outputs, self.out_ptr = self._dataset(self.out_size)

    def _check(self, ret: int, what: str) -> None:
        if ret != ACL_SUCCESS:
            raise RouteFailedError(f"om: {what} failed (ACL error {ret})")

    def _dataset(self, size: int) -> tuple[Any, Any]:
        acl = self.acl
        ptr, ret = acl.rt.malloc(size, ACL_MEM_MALLOC_HUGE_FIRST)
        self._check(ret, "acl.rt.malloc")
        buf = acl.create_data_buffer(ptr, size)
        self.buffers.append((ptr, buf))
        dataset = acl.mdl.create_dataset()
        _, ret = acl.mdl.add_dataset_buffer(dataset, buf)
        self._check(ret, "acl.mdl.add_dataset_buffer")
        return dataset, ptr

    def run(self, x: np.ndarray) -> np.ndarray:
        acl = self.acl
        x = np.ascontiguousarray(x, np.float32)
        if x.nbytes != self.in_size:
            raise RouteFailedError(f"om: the .om takes {self.in_size} bytes of input, got {x.nbytes} ({x.shape})")
        self._check(acl.rt.memcpy(self.in_ptr, self.in_size, x.ctypes.data, x.nbytes, ACL_MEMCPY_HOST_TO_DEVICE),
                    "acl.rt.memcpy (to the device)")
        self._check(acl.mdl.execute(self.model_id, self.inputs, self.outputs), "acl.mdl.execute")
        out = np.empty(self.out_size // np.dtype(self.out_dtype).itemsize, self.out_dtype)
        self._check(acl.rt.memcpy(out.ctypes.data, out.nbytes, self.out_ptr, self.out_size,
                                  ACL_MEMCPY_DEVICE_TO_HOST), "acl.rt.memcpy (to the host)")
        return out.reshape(self.out_shape)

    @staticmethod
    def versions() -> dict[str, str | None]:
        from modnet_npu.runtime.devices import cann_version

        return {"acl": "pyACL (CANN)", "cann": cann_version()}

    def close(self) -> None:
        acl = self.acl
        acl.mdl.unload(self.model_id)
        acl.mdl.destroy_desc(self.desc)
        for dataset in (self.inputs, self.outputs):
            acl.mdl.destroy_dataset(dataset)
        for ptr, buf in self.buffers:
            acl.destroy_data_buffer(buf)
            acl.rt.free(ptr)
        if self.owned:  # never reset a device or finalise ACL under torch_npu's feet
            acl.rt.reset_device(self.device_id)
            acl.finalize()


RUNTIMES = {"ais_bench": AisBenchRuntime, "acl": AclRuntime}


class OmRoute:
    """The compiled .om files (one per input size) through one OM runtime; host arrays in and out."""

    name = "om"

    def __init__(self, compiled: Mapping[tuple[int, int], Compiled], *, runtime: str, device_id: int,
                 precision: str, benchmark_size: tuple[int, int]) -> None:
        self.compiled, self.kind, self.device_id, self.precision = dict(compiled), runtime, device_id, precision
        self.sessions: dict[tuple[int, int], Any] = {}
        self.benchmark_size = benchmark_size
        self.load_s: float | None = None
        try:
            for size, c in self.compiled.items():
                start = time.perf_counter()
                self.sessions[size] = RUNTIMES[runtime](c.om_path, device_id)
                if size == benchmark_size:
                    self.load_s = time.perf_counter() - start
            start = time.perf_counter()
            self.run(np.zeros((1, 3, *benchmark_size), np.float32))
            self.first_call_ms = (time.perf_counter() - start) * 1000.0
        except BaseException:
            self.close()
            raise

    def _session(self, size: tuple[int, int]) -> Any:
        try:
            return self.sessions[size]
        except KeyError:
            raise RouteFailedError(f"om: no .om compiled for {size[0]}x{size[1]}") from None

    def run(self, x: np.ndarray) -> np.ndarray:
        session = self._session(tuple(x.shape[2:]))
        try:  # compiled for batch 1: a batch goes image by image (one image as it is: no copy in the timed call)
            if x.shape[0] == 1:
                return session.run(x)
            return np.concatenate([session.run(x[i: i + 1]) for i in range(x.shape[0])])
        except RouteFailedError:
            raise
        except Exception as exc:
            raise RouteFailedError(f"om: {self.kind} failed to run the model: {one_line(str(exc), 300)}") from None

    call = run

    def infer(self, x: np.ndarray) -> np.ndarray:
        out = np.asarray(self.run(x), np.float32)
        return out.reshape(x.shape[0], *x.shape[2:])  # (N, 1, h, w) -> (N, h, w)

    def device_times_ms(self, last: int) -> list[float] | None:
        """The runtime's own device times of the last ``last`` benchmark-size runs (ais_bench only)."""
        session = self.sessions.get(self.benchmark_size)
        get = getattr(session, "device_times_ms", None)
        if get is None:
            return None
        times = get()
        return times[-last:] if len(times) >= last else None

    def setup(self) -> RouteSetup:
        c = self.compiled[self.benchmark_size]
        return RouteSetup(
            runtime=f"{self.kind} on an ATC .om ({c.soc_version})",
            versions=RUNTIMES[self.kind].versions(), device=f"npu:{self.device_id}", precision=self.precision,
            precision_mode=c.precision_flag.lstrip("-") if c.precision_flag else NATIVE_MODE,
            options={"atc_argv": list(c.argv), "soc_version": c.soc_version,
                     "om": {f"{h}x{w}": v.om_path for (h, w), v in sorted(self.compiled.items())},
                     "atc_log": c.log_path})

    def first_run(self) -> FirstRun:
        c = self.compiled[self.benchmark_size]
        return FirstRun(atc_s=c.atc_s, atc_cached=c.cached, load_s=self.load_s, first_call_ms=self.first_call_ms,
                        note="ATC: compile (on a cache hit, the compile that made it); load: the .om into "
                             f"{self.kind}; first call at the benchmark shape")

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()
        self.sessions = {}


def compile_all(sizes: Sequence[tuple[int, int]], **kwargs: Any) -> dict[tuple[int, int], Compiled]:
    """One .om per distinct size (``kwargs``: :func:`atc.compile_om`'s, less ``shape``)."""
    from modnet_npu.routes.atc import compile_om

    return {size: compile_om(shape=(1, 3, *size), **kwargs) for size in dict.fromkeys(sizes)}
