"""The runner's decisions that need no GPU: buffer geometry from the profile, why a plan did not
deserialise, and layer precisions from the engine inspector's JSON (both TensorRT 10's and 11's schema).
The runner itself (deserialise, buffers, streams) runs in tests/gpu/test_tensorrt_backend.py."""

from __future__ import annotations

import json

import pytest

from engines.errors import EngineBuildError, PlanLoadError
from engines.tensorrt.runner import classify_load_failure, layer_precisions, profile_geometry

PROFILE = [(1, 3, 112, 112), (32, 3, 112, 112), (64, 3, 112, 112)]


def test_dynamic_height_and_width_come_from_the_profile_not_the_minus_ones():
    # what get_tensor_shape says for a graph exported with dynamic H and W
    sample, batches = profile_geometry((-1, 3, -1, -1), PROFILE)
    assert sample == (3, 112, 112) and batches == (1, 32, 64)


def test_a_fixed_shape_needs_no_profile_and_a_dynamic_batch_only_its_batch_range():
    assert profile_geometry((8, 3, 112, 112), []) == ((3, 112, 112), (8, 8, 8))
    assert profile_geometry((-1, 3, 112, 112), PROFILE) == ((3, 112, 112), (1, 32, 64))
    assert profile_geometry((4, 3, -1, -1), [(4, 3, 112, 112)] * 3) == ((3, 112, 112), (4, 4, 4))


def test_a_profile_that_lets_the_face_size_vary_is_refused():
    with pytest.raises(EngineBuildError, match="one face size"):
        profile_geometry((-1, 3, -1, -1), [(1, 3, 96, 96), (32, 3, 112, 112), (64, 3, 128, 128)])


def test_why_a_plan_did_not_deserialise_is_read_from_what_tensorrt_said():
    oom = "[ERROR] 1: [defaultAllocator.cpp::allocate::31] Error Code 1: Cuda Runtime (out of memory)"
    assert classify_load_failure([oom]) == "out_of_memory"
    assert classify_load_failure(["[ERROR] CUDA initialization failure with error: 35"]) == "driver"
    assert classify_load_failure(["[ERROR] IRuntime::deserializeCudaEngine: Error Code 6: API Usage Error "
                                  "(The engine plan file is generated on an incompatible device, expecting "
                                  "compute 8.9 got compute 8.6, please rebuild.)"]) == "incompatible"
    assert classify_load_failure([]) == "unknown"


def test_only_a_refusal_of_the_plan_itself_puts_the_plan_at_fault():
    for cause, at_fault in (("incompatible", True), ("unknown", True), ("out_of_memory", False),
                            ("driver", False)):
        assert PlanLoadError("x", cause=cause).plan_at_fault is at_fault


def _layers(*outputs: dict) -> list[dict]:
    return [{"Name": f"layer{i}", "LayerType": "CaskConvolution", "Inputs": [], "Outputs": [out]}
            for i, out in enumerate(outputs)]


def test_layer_precisions_in_tensorrt_10s_schema():
    info = {"Layers": _layers(
                {"Name": "a", "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"},
                {"Name": "b", "Format/Datatype": "Row major linear FP32"},
                {"Name": "c", "Format/Datatype": "Half"}),
            "Bindings": ["input.1", "683"]}
    assert layer_precisions(json.dumps(info)) == {"fp16": 2, "fp32": 1}


def test_layer_precisions_in_tensorrt_11s_schema():
    info = {"Layers": _layers(
                {"Name": "a", "Format": "Row major linear FP16 format (kLINEAR)", "Datatype": "Half"},
                {"Name": "b", "Format": "Row major linear FP32 format (kLINEAR)", "Datatype": "Float"},
                {"Name": "c", "Datatype": "BFloat16"}, {"Name": "d", "Datatype": "Int8"}),
            "I/O Tensors": [{"Name": "input.1", "IOMode": "Input", "DataType": "Float"}]}
    assert layer_precisions(json.dumps(info)) == {"bf16": 1, "fp16": 1, "fp32": 1, "int8": 1}


def test_a_plan_without_detailed_profiling_cannot_prove_its_precision():
    with pytest.raises(ValueError, match="DETAILED"):
        layer_precisions(json.dumps({"Layers": ["conv1 + bn1", "fc"], "Bindings": []}))
