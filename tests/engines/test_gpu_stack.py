"""The GPU stack check: its logic on the facts of hosts that are right and wrong in each way, and the
real check on this host (a CPU build of onnxruntime, no cuda-python, no TensorRT: it must say so)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

from engines.gpu_stack import StackFacts, kernel_driver_version, stack_notes, stack_problems

GOOD = StackFacts(
    onnxruntime_version="1.31.1", onnxruntime_distributions={"onnxruntime-gpu": "1.31.1"},
    onnxruntime_device="GPU", onnxruntime_cuda="13.0",
    available_providers=["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    session_providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
    driver_version="580.65.06", driver_cuda=13000, runtime_cuda=13040, cuda_python_version="13.4.4",
    tensorrt_version="11.4.0.106", tensorrt_cuda_major=13,
)


def test_the_stack_as_documented_has_no_problem():
    assert stack_problems(GOOD) == []


def test_a_cuda_ep_that_is_compiled_in_but_does_not_load_is_a_problem():
    # what `get_available_providers()` alone (the old install check) called fine
    facts = replace(GOOD, session_providers=["CPUExecutionProvider"],
                    session_error="Failed to load libcublasLt.so.13")
    (problem,) = stack_problems(facts)
    assert "could not start CUDAExecutionProvider" in problem and "libcublasLt.so.13" in problem
    assert "driver 580.65.06" in problem  # what was there is said with it


def test_an_old_driver_is_named_with_the_driver_the_stack_needs():
    facts = replace(GOOD, driver_version="550.90.07", driver_cuda=12040,
                    session_providers=["CPUExecutionProvider"],
                    session_error="CUDA failure 35: CUDA driver version is insufficient for CUDA runtime")
    problems = stack_problems(facts)
    assert any("driver 550.90.07, supports CUDA 12.4" in p and "580 or newer" in p for p in problems)
    assert any("insufficient" in p for p in problems)


def test_a_cpu_onnxruntime_a_cuda_12_tensorrt_and_missing_packages_are_each_named():
    cpu = replace(GOOD, onnxruntime_device="CPU", onnxruntime_distributions={"onnxruntime": "1.31.1"},
                  available_providers=["CPUExecutionProvider"], session_providers=None)
    assert "CPU build of onnxruntime" in stack_problems(cpu)[0]
    cu12 = replace(GOOD, tensorrt_cuda_major=12)
    assert stack_problems(cu12) == ["TensorRT 11.4.0.106 is built for CUDA 12; the stack's is tensorrt-cu13"]
    no_trt = replace(GOOD, tensorrt_version=None, tensorrt_cuda_major=None)
    assert "not installed" in stack_problems(no_trt)[0]
    assert stack_problems(no_trt, need_tensorrt=False) == []
    assert "cuda-python is not installed" in stack_problems(replace(GOOD, cuda_python_version=None))[0]
    assert "CUDA 12.9" in stack_problems(replace(GOOD, runtime_cuda=12090))[0]
    assert "built for CUDA 12.8" in stack_problems(replace(GOOD, onnxruntime_cuda="12.8"))[0]


def test_the_notes_say_the_tensorrt_ep_is_not_part_of_the_stack():
    notes = stack_notes(GOOD)
    assert any("libnvinfer.so.10" in n for n in notes)
    both = replace(GOOD, onnxruntime_distributions={"onnxruntime": "1.31.1", "onnxruntime-gpu": "1.31.1"})
    assert any("both onnxruntime distributions" in n for n in stack_notes(both))


def test_the_kernel_driver_version_is_read_from_proc(tmp_path):
    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
                    "(dvs-builder@U16-I3-B17-4-3)  Sun Jul 27 07:09:47 UTC 2025\nGCC version:  gcc 12.3.0\n")
    assert kernel_driver_version(proc) == "580.65.06"
    assert kernel_driver_version(tmp_path / "absent") is None


def test_the_install_check_fails_on_this_cpu_host_and_says_why():
    proc = subprocess.run([sys.executable, "-m", "engines.gpu_stack"], capture_output=True, text=True,
                          timeout=120)
    import onnxruntime as ort

    if ort.get_device() == "GPU":  # a GPU host: this is the real check, its verdict is that host's
        return
    assert proc.returncode == 1
    assert "CPU build of onnxruntime" in proc.stderr and "GPU stack NOT OK" in proc.stdout
