"""Every TensorRT and cuda-python name the code uses exists, with a signature that accepts the call,
in each major version the project supports: TensorRT 10 (10.13) and 11 (11.4), cuda-python 12 (12.9)
and 13 (13.4).

**Names and signatures only.** The real bindings (pinned wheels that ``make api-bindings`` fetches
into ``.venv/trt-bindings/{10,11}`` and ``.venv/cuda-bindings/{12,13}``, never importable from the
venv) are imported in a subprocess per version, the TensorRT ones against stand-in libraries
(``tests/helpers/trt_standins``) that export the entry points the bindings resolve at load and run
nothing. ``tests/helpers/api_conformance.py`` walks the syntax trees of ``engines/`` and ``scripts/``
(an AST walk, not a hand-kept list) and checks each use against the binding. Nothing builds, loads
or runs an engine here, and no other test may use the stand-ins: the GPU tests do that for real.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# each check is a subprocess per binding version (7 s together): out of the quick loop
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
CHECKER = ROOT / "tests" / "helpers" / "api_conformance.py"
VENV = ROOT / ".venv"
VERSIONS = {"tensorrt": ("10", "11"), "cuda": ("12", "13")}


def _dirs(family: str, major: str) -> tuple[Path, Path | None]:
    if family == "tensorrt":
        where = VENV / "trt-bindings" / major
        return where, where / "standins"
    return VENV / "cuda-bindings" / major, None


def _need_bindings() -> None:
    missing = [str(_dirs(f, m)[0]) for f, majors in VERSIONS.items() for m in majors
               if not _dirs(f, m)[0].is_dir()]
    if missing:
        message = f"the pinned bindings are not installed ({missing}): run `make api-bindings`"
        if os.environ.get("ARCFACE_REQUIRE_API_BINDINGS"):
            pytest.fail(message)  # `make test` installs them first: their absence is a broken install
        pytest.skip(message)


def run_checker(family: str, major: str, *sources: Path, mismatch_check: bool = False) -> dict:
    path, libs = _dirs(family, major)
    env = {**os.environ, "PYTHONPATH": str(path)}
    if libs is not None:
        env["LD_LIBRARY_PATH"] = str(libs)
    cmd = [sys.executable, str(CHECKER), "--family", family, "--root", str(ROOT), *map(str, sources)]
    if mismatch_check:
        cmd.append("--mismatch-check")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@functools.cache
def report(family: str, major: str) -> dict:
    return run_checker(family, major, mismatch_check=family == "tensorrt")


def _violations(family: str) -> list[str]:
    """Unguarded uses missing or refused in any version; guarded ones missing in every version."""
    by_use: dict[tuple, list[dict]] = {}
    for major in VERSIONS[family]:
        for use in report(family, major)["usages"]:
            where = (use["file"], use["line"], use["kind"], use["target"], use["expr"])
            by_use.setdefault(where, []).append(use)
    out = []
    for (file, line, _kind, _target, expr), uses in sorted(by_use.items()):
        failed = [u["problem"] for u in uses if not u["ok"]]
        guarded = all(u["guarded"] for u in uses)
        if (failed and not guarded) or (guarded and len(failed) == len(VERSIONS[family])):
            out.append(f"{file}:{line} {expr}: {'; '.join(failed)}")
    return out


@pytest.mark.parametrize("family", ["tensorrt", "cuda"])
def test_every_name_the_code_uses_exists_in_each_supported_major(family):
    _need_bindings()
    versions = {major: report(family, major)["version"] for major in VERSIONS[family]}
    assert [v.split(".")[0] for v in versions.values()] == list(VERSIONS[family]), versions
    assert _violations(family) == []


# A walk that silently stopped typing the code would "pass" with nothing checked: these uses
# must be among the checked ones (one per step of the plan's life, and the cuda calls the runner needs).
ANCHORS = {
    "tensorrt": {"Builder", "Builder.create_network", "OnnxParser.parse_from_file", "IBuilderConfig.set_flag",
                 "IBuilderConfig.set_timing_cache", "IOptimizationProfile.set_shape",
                 "Builder.build_serialized_network", "Runtime.deserialize_cuda_engine",
                 "ICudaEngine.get_tensor_profile_shape", "ICudaEngine.create_execution_context",
                 "IExecutionContext.set_tensor_address", "IExecutionContext.execute_async_v3",
                 "IBuilderConfig.hardware_compatibility_level", "HardwareCompatibilityLevel.AMPERE_PLUS",
                 "EngineInspector.get_engine_information", "ILogger.log", "INetworkDefinition.get_input"},
    "cuda": {"cudaSetDevice", "cudaGetDeviceProperties", "cudaDeviceProp.major", "cudaMalloc",
             "cudaMallocHost", "cudaMemcpyAsync", "cudaMemcpyKind.cudaMemcpyHostToDevice", "cudaStreamCreate",
             "cudaStreamSynchronize", "cudaMemGetInfo", "cudaDriverGetVersion", "cudaGetErrorName"},
}


@pytest.mark.parametrize("family", ["tensorrt", "cuda"])
def test_the_walk_checks_the_calls_that_matter(family):
    _need_bindings()
    for major in VERSIONS[family]:
        checked = {u["target"] for u in report(family, major)["usages"]}
        assert ANCHORS[family] <= checked, sorted(ANCHORS[family] - checked)
        calls = [u for u in report(family, major)["usages"] if u["kind"] == "call"]
        assert len(calls) >= (30 if family == "tensorrt" else 15)


def test_the_check_fails_on_a_name_one_version_lacks_and_on_a_refused_argument(tmp_path):
    _need_bindings()
    source = tmp_path / "uses.py"
    source.write_text(textwrap.dedent("""
        def build(import_tensorrt):
            trt = import_tensorrt()
            config = trt.Builder(trt.Logger()).create_builder_config()
            config.set_flag(trt.BuilderFlag.FP16)                    # gone in TensorRT 11
            config.set_timing_cache(None, ignore_mismatch=False)     # None for an ITimingCache
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 20, 3)  # one argument too many
            if hasattr(trt.BuilderFlag, "FP16"):
                config.set_flag(trt.BuilderFlag.FP16)                # guarded: fine
            engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(b"")
            return engine.device_memory_size                         # gone in TensorRT 11
    """))
    found = {major: {(u["line"], u["target"]): u for u in run_checker("tensorrt", major, source)["usages"]}
             for major in VERSIONS["tensorrt"]}
    fp16, cache, pool = (5, "BuilderFlag.FP16"), (6, "IBuilderConfig.set_timing_cache"), (
        7, "IBuilderConfig.set_memory_pool_limit")
    v1 = (11, "ICudaEngine.device_memory_size")
    assert found["10"][fp16]["ok"] and not found["11"][fp16]["ok"]
    assert "no attribute 'FP16'" in found["11"][fp16]["problem"]
    assert found["10"][v1]["ok"] and not found["11"][v1]["ok"]
    for major in VERSIONS["tensorrt"]:
        assert not found[major][cache]["ok"] and "None for" in found[major][cache]["problem"]
        assert not found[major][pool]["ok"] and "3 positional" in found[major][pool]["problem"]
        guarded = found[major][(9, "BuilderFlag.FP16")]
        assert guarded["guarded"] and guarded["ok"] == (major == "10")


def test_a_cuda_call_with_a_wrong_keyword_is_caught(tmp_path):
    _need_bindings()
    source = tmp_path / "uses.py"
    source.write_text("def f(cudart):\n    rt = cudart()\n    rt.cudaMemcpyAsync(0, 0, 8, stream=0)\n"
                      "    rt.cudaStreamCreateWithPriorityAndMagic()\n")
    for major in VERSIONS["cuda"]:
        uses = {(u["line"], u["kind"]): u for u in run_checker("cuda", major, source)["usages"]}
        assert not uses[(3, "call")]["ok"] and "missing ['kind']" in uses[(3, "call")]["problem"]
        assert not uses[(4, "attr")]["ok"]


def test_api_mismatch_is_told_from_our_own_bugs_on_the_real_bindings():
    """``runtime.is_api_mismatch`` on real errors of both bindings: only TensorRT's refusals count."""
    _need_bindings()
    for major in VERSIONS["tensorrt"]:
        assert report("tensorrt", major)["mismatch_classification"] == {
            "missing enum member": True, "rejected constructor arguments": True,
            "attribute of None (our bug)": False, "TypeError of ours": False,
        }


def test_the_bindings_never_reach_the_venv_path():
    """They are read by the subprocesses above only: ``tensorrt_installed()`` stays honest."""
    from engines.tensorrt.runtime import tensorrt_installed

    ignored = [str(VENV / "trt-bindings"), str(VENV / "cuda-bindings")]
    assert not [p for p in sys.path if any(p.startswith(i) for i in ignored)]
    import importlib.util

    assert importlib.util.find_spec("tensorrt_bindings") is None or tensorrt_installed()
