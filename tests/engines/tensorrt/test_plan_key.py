"""What a plan key tells apart, and what it lets share: device model, the CUDA major of the TensorRT
build, and the hardware-compatibility level (a plan may travel exactly as far as TensorRT allows)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engines.tensorrt.plan_key import BuildSettings, BuildTarget, parse_key, plan_key, plan_mismatch

H100 = BuildTarget((9, 0), "11.4.0.106", "NVIDIA H100 80GB HBM3", 13)
H200 = BuildTarget((9, 0), "11.4.0.106", "NVIDIA H200", 13)
A100 = BuildTarget((8, 0), "11.4.0.106", "NVIDIA A100-SXM4-80GB", 13)
A10G = BuildTarget((8, 6), "11.4.0.106", "NVIDIA A10G", 13)
T4 = BuildTarget((7, 5), "11.4.0.106", "Tesla T4", 13)


def key(model, target, level="none", precision="fp32"):
    return plan_key(model, BuildSettings(precision=precision, hardware_compatibility=level), target)


def test_two_device_models_of_one_compute_capability_get_two_plans(mbf_model):
    assert H100.sm == H200.sm == "sm90"
    assert key(mbf_model, H100) != key(mbf_model, H200)
    fields = parse_key(key(mbf_model, H100))
    assert fields["sm"] == "90" and fields["device"] == H100.device_tag[1:] and fields["hc"] is None


def test_a_cuda_12_and_a_cuda_13_build_of_one_tensorrt_version_get_two_plans(mbf_model):
    cu12 = replace(H100, trt_cuda_major=12)
    assert cu12.trt_version == H100.trt_version
    assert key(mbf_model, cu12) != key(mbf_model, H100)
    assert parse_key(key(mbf_model, cu12))["cuda"] == "12"
    assert parse_key(key(mbf_model, replace(H100, trt_cuda_major=None)))["cuda"] == "unknown"


def test_an_ampere_plus_plan_is_one_plan_for_every_sm80_plus_device(mbf_model):
    keys = {key(mbf_model, t, "ampere_plus") for t in (A100, A10G, H100, H200)}
    assert len(keys) == 1
    (shared,) = keys
    assert parse_key(shared)["family"] == "ampere_plus" and parse_key(shared)["hc"] == "ampere_plus"
    assert shared != key(mbf_model, A100)
    with pytest.raises(ValueError, match="sm80"):
        key(mbf_model, T4, "ampere_plus")


def test_a_same_compute_capability_plan_is_shared_by_device_models_of_that_capability(mbf_model):
    assert key(mbf_model, H100, "same_compute_capability") == key(mbf_model, H200, "same_compute_capability")
    assert key(mbf_model, H100, "same_compute_capability") != key(mbf_model, A100, "same_compute_capability")


def test_every_key_parses_back(mbf_model):
    for target in (H100, A10G, replace(T4, trt_cuda_major=None)):
        for level in ("none", "same_compute_capability", "ampere_plus"):
            if level == "ampere_plus" and target.compute_capability < (8, 0):
                continue
            fields = parse_key(key(mbf_model, target, level))
            assert fields is not None and fields["sha8"] == mbf_model.sha256[:8]
            assert fields["trt"] == target.trt_version


def _sidecar(target: BuildTarget, level: str = "none") -> dict:
    return {"tensorrt_version": target.trt_version, "tensorrt_cuda_major": target.trt_cuda_major,
            "compute_capability": target.to_dict()["compute_capability"], "gpu_name": target.gpu_name,
            "hardware_compatibility": level}


def test_the_sidecar_is_checked_against_the_host_on_load():
    none = BuildSettings(hardware_compatibility="none")
    assert plan_mismatch(_sidecar(H100), H100, none) is None
    assert "NVIDIA H100" in plan_mismatch(_sidecar(H100), H200, none)
    assert "CUDA 12" in plan_mismatch(_sidecar(replace(H100, trt_cuda_major=12)), H100, none)
    assert "TensorRT 10.13" in plan_mismatch(_sidecar(replace(H100, trt_version="10.13.3.9")), H100, none)
    ampere = BuildSettings(hardware_compatibility="ampere_plus")
    assert plan_mismatch(_sidecar(A100, "ampere_plus"), H200, ampere) is None  # travels across SMs
    same_cc = BuildSettings(hardware_compatibility="same_compute_capability")
    assert plan_mismatch(_sidecar(H100, "same_compute_capability"), H200, same_cc) is None
    assert "compute capability 8.0" in plan_mismatch(_sidecar(A100), H100, same_cc)
    # a sidecar from before a fact was recorded is not refused for lacking it
    assert plan_mismatch({"tensorrt_version": H100.trt_version}, H100, none) is None
