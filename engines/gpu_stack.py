"""The one GPU stack this project supports, and whether this host really loads it.

The stack is CUDA 13 throughout, so the NVIDIA driver must be R580 or newer:

- TensorRT 11.4 built for CUDA 13 (``tensorrt==11.4.0.106`` installs ``tensorrt-cu13``),
  the native ``tensorrt`` backend;
- cuda-python 13.4.4 (``cuda.bindings.runtime``), for buffers, streams and device facts;
- onnxruntime-gpu 1.31.1 for the ``onnx`` backend's CUDA EP, which links cuBLAS and
  cuBLASLt 13, cuRAND 10 and cudart 13 and loads cuDNN 9: NVIDIA's PyPI wheels
  (``nvidia-cuda-runtime``, ``nvidia-cublas``, ``nvidia-curand``, ``nvidia-cudnn-cu13``),
  loaded with ``onnxruntime.preload_dlls()``.

Not part of it: ONNX Runtime's TensorRT EP, whose provider library links TensorRT 10
(``libnvinfer.so.10``); it is off by default and needs a TensorRT 10 on the library path.

``stack_problems`` is the logic (facts in, problems out, no I/O: tested on CPU);
``gather_facts`` looks at the host, and opens a real CUDA EP session, because
``get_available_providers()`` lists what the wheel was compiled with, not what loads.
``python -m engines.gpu_stack`` is the check ``make install-gpu`` / ``install-cuda`` end with.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .tensorrt.cuda import MIN_DRIVER, STACK_CUDA_MAJOR

logger = logging.getLogger(__name__)

CUDA_EP = "CUDAExecutionProvider"
TRT_EP = "TensorrtExecutionProvider"


@dataclass
class StackFacts:
    """What the host has, as found (``None``: not found / not applicable)."""

    onnxruntime_version: str | None = None
    onnxruntime_distributions: dict[str, str] = field(default_factory=dict)
    onnxruntime_device: str | None = None  # "GPU" only in the GPU build (compiled in)
    onnxruntime_cuda: str | None = None  # CUDA version the GPU build was compiled for
    available_providers: list[str] = field(default_factory=list)
    session_providers: list[str] | None = None  # active in a real session on device 0
    session_error: str | None = None
    driver_version: str | None = None  # kernel module, e.g. "580.65.06"
    driver_cuda: int | None = None  # cudaDriverGetVersion, e.g. 13000; 0: no driver
    runtime_cuda: int | None = None  # cuda-python's cudaRuntimeGetVersion
    cuda_python_version: str | None = None
    tensorrt_version: str | None = None
    tensorrt_cuda_major: int | None = None


def _cuda_text(version: int) -> str:
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_text(facts: StackFacts) -> str:
    """The driver as one phrase: its version and the newest CUDA it supports."""
    parts = []
    if facts.driver_version:
        parts.append(f"driver {facts.driver_version}")
    if facts.driver_cuda:
        parts.append(f"supports CUDA {_cuda_text(facts.driver_cuda)}")
    elif facts.driver_cuda == 0:
        parts.append("no CUDA driver answering")
    return ", ".join(parts) or "driver unknown"


def stack_problems(facts: StackFacts, need_tensorrt: bool = True) -> list[str]:
    """Everything that keeps ``facts`` from being the stack above; empty means it is.

    ``need_tensorrt=False`` is ``make install-cuda``'s host (CUDA EP and cuda-python only).
    """
    problems: list[str] = []
    driver_old = facts.driver_cuda is not None and facts.driver_cuda < STACK_CUDA_MAJOR * 1000
    if driver_old:
        problems.append(f"{driver_text(facts)}: this stack is CUDA {STACK_CUDA_MAJOR}; install NVIDIA driver "
                        f"{MIN_DRIVER} or newer")
    if facts.onnxruntime_version is None:
        problems.append("onnxruntime is not importable")
    elif facts.onnxruntime_device != "GPU":
        problems.append(
            f"the CPU build of onnxruntime {facts.onnxruntime_version} answers `import onnxruntime` "
            f"(installed: {facts.onnxruntime_distributions}); run `make install-gpu` (README 'GPU install')")
    else:
        cuda = facts.onnxruntime_cuda or ""
        if cuda and cuda.split(".")[0] != str(STACK_CUDA_MAJOR):
            problems.append(f"onnxruntime-gpu {facts.onnxruntime_version} is built for CUDA {cuda}, "
                            f"not {STACK_CUDA_MAJOR}")
        if CUDA_EP not in facts.available_providers:
            problems.append(f"onnxruntime-gpu offers no {CUDA_EP} (providers: {facts.available_providers})")
        elif facts.session_providers is None or CUDA_EP not in facts.session_providers:
            seen = facts.session_error or f"the session runs on {facts.session_providers}"
            hint = "" if driver_old else (
                "; are NVIDIA's CUDA 13 / cuDNN 9 wheels installed (make install-gpu) and a device visible?")
            problems.append(f"a real session could not start {CUDA_EP} ({seen}); {driver_text(facts)}{hint}")
    if facts.cuda_python_version is None:
        problems.append("cuda-python is not installed (the gpu extra installs it)")
    elif facts.runtime_cuda and facts.runtime_cuda // 1000 != STACK_CUDA_MAJOR:
        problems.append(f"cuda-python {facts.cuda_python_version} is CUDA {_cuda_text(facts.runtime_cuda)}, "
                        f"not {STACK_CUDA_MAJOR}")
    if facts.tensorrt_version is None:
        if need_tensorrt:
            problems.append("TensorRT is not installed (make install-gpu; make install-cuda is for hosts "
                            "without it)")
    elif facts.tensorrt_cuda_major != STACK_CUDA_MAJOR:
        built = (f"for CUDA {facts.tensorrt_cuda_major}" if facts.tensorrt_cuda_major is not None
                 else "for an unknown CUDA (no tensorrt-cuNN distribution)")
        problems.append(f"TensorRT {facts.tensorrt_version} is built {built}; the stack's is tensorrt-cu"
                        f"{STACK_CUDA_MAJOR}")
    return problems


def stack_notes(facts: StackFacts) -> list[str]:
    """Things worth knowing that are not failures."""
    notes = []
    if len(facts.onnxruntime_distributions) > 1:
        notes.append(f"both onnxruntime distributions are installed ({facts.onnxruntime_distributions}); "
                     "the module in use comes from the one installed last")
    if TRT_EP in facts.available_providers:
        notes.append(f"{TRT_EP} is compiled into onnxruntime-gpu but not part of this stack (it links "
                     "TensorRT 10, libnvinfer.so.10); the native tensorrt backend is the TensorRT path")
    return notes


def kernel_driver_version(proc: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The NVIDIA kernel module's version (``580.65.06``) from ``/proc``, without CUDA."""
    try:
        text = proc.read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module(?: for \w+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else None


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _tiny_graph() -> bytes:
    """A real one-node ONNX graph (Relu on float [N, 8]) for the session check."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "stack_check", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def cuda_ep_session(device_id: int = 0) -> tuple[list[str] | None, str | None]:
    """Open a real session with the CUDA EP on ``device_id`` and run it once.

    Returns ``(active providers, error)``: the providers the session actually
    runs on (ORT falls back to the CPU with a warning when the CUDA EP cannot
    load), or ``None`` and what went wrong.
    """
    import numpy as np
    import onnxruntime as ort

    from .backends.onnx import preload_cuda_libraries

    said = preload_cuda_libraries()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        providers = [(CUDA_EP, {"device_id": device_id}), "CPUExecutionProvider"]
        session = ort.InferenceSession(_tiny_graph(), sess_options=options, providers=providers)
        out = session.run(None, {"x": np.array([[-1.0] * 4 + [1.0] * 4], np.float32)})[0]
    except Exception as exc:  # any failure to start is the answer, not a crash of the check
        return None, f"{type(exc).__name__}: {exc}" + (f" (preload_dlls: {said})" if said else "")
    if not (out[0, :4] == 0).all():
        return None, f"the session computed Relu wrong: {out}"
    active = session.get_providers()
    error = None if CUDA_EP in active else (f"preload_dlls said: {said}" if said else None)
    return active, error


def gather_facts(session_check: bool = True, device_id: int = 0) -> StackFacts:
    """What this host has; ``session_check`` also opens a real CUDA EP session when it can."""
    facts = StackFacts(driver_version=kernel_driver_version())
    try:
        import onnxruntime as ort

        from .backends.onnx import onnxruntime_build

        build = onnxruntime_build()
        facts.onnxruntime_version = build["version"]
        facts.onnxruntime_distributions = build["distributions"]
        facts.onnxruntime_device = ort.get_device()
        facts.onnxruntime_cuda = str(getattr(ort, "cuda_version", "") or "") or None
        facts.available_providers = list(build["available_providers"])
        if session_check and facts.onnxruntime_device == "GPU" and CUDA_EP in facts.available_providers:
            facts.session_providers, facts.session_error = cuda_ep_session(device_id)
    except ImportError:
        pass
    facts.cuda_python_version = _version("cuda-python") or _version("cuda-bindings")
    if facts.cuda_python_version is not None:
        try:
            from .tensorrt import cuda as cuda_rt

            facts.driver_cuda, facts.runtime_cuda = cuda_rt.driver_version(), cuda_rt.runtime_version()
        except Exception as exc:  # cuda-python present but broken: a fact, not a crash
            logger.warning("cuda-python did not answer: %s", exc)
    from .tensorrt.runtime import tensorrt_cuda_major, tensorrt_installed, trt_version

    if tensorrt_installed():
        try:
            facts.tensorrt_version = trt_version()
        except Exception as exc:  # installed but does not import (its libraries missing): say so
            facts.tensorrt_version = f"installed but not importable ({type(exc).__name__}: {exc})"
        facts.tensorrt_cuda_major = tensorrt_cuda_major()
    return facts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engines.gpu_stack",
        description="check that this host loads the GPU stack (README 'GPU install')")
    parser.add_argument("--without-tensorrt", action="store_true",
                        help="a host without TensorRT (make install-cuda): CUDA EP and cuda-python only")
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    facts = gather_facts(device_id=args.device_id)
    problems = stack_problems(facts, need_tensorrt=not args.without_tensorrt)
    notes = stack_notes(facts)
    if args.json:
        print(json.dumps({"facts": asdict(facts), "problems": problems, "notes": notes}, indent=2))
    else:
        print(f"onnxruntime {facts.onnxruntime_version} ({facts.onnxruntime_device}, CUDA "
              f"{facts.onnxruntime_cuda}), session providers {facts.session_providers}; "
              f"{driver_text(facts)}; cuda-python {facts.cuda_python_version}; TensorRT "
              f"{facts.tensorrt_version} (CUDA {facts.tensorrt_cuda_major})")
        for note in notes:
            print(f"note: {note}")
        for problem in problems:
            print(f"PROBLEM: {problem}", file=sys.stderr)
        print("GPU stack OK" if not problems else f"GPU stack NOT OK ({len(problems)} problem(s))")
    return 0 if not problems else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
