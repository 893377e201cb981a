"""One check of a fresh GPU host, after ``make install-gpu`` (or ``install-cuda``): ``make gpu-check``.

Runs, in order, each step in its own process with its own time limit, inside a total budget
(default 600 s), and writes one JSON report (``<out>/report.json``):

1. ``facts``: driver, devices (name, compute capability, memory), versions of the stack;
2. ``cuda_python``: the cuda-python GPU tests (tests/gpu/test_cuda_rt.py);
3. ``onnx_parse``: the fp32 / fp16 / int8 graphs of the model through TensorRT's ONNX parser,
   parse only (no build): I/O dtypes and layer counts;
4. ``tensorrt_backend``: the TensorRT backend GPU tests on synthetic:mobilefacenet
   (tests/gpu/test_tensorrt_backend.py without the IResNet-50 cases);
5. ``fp16_is_fp16``: layer precisions of the fp16 and fp32 plans (engine inspector) and their
   measured speed at the bench batch;
6. ``cuda_ep``: a real ONNX Runtime session on the CUDA EP (``python -m engines.gpu_stack``);
7. ``bench``: ``arcface bench --backends onnx,tensorrt`` at batch 32 on the device, with the
   device memory each engine holds.

A step whose needs the host lacks (no CUDA device, no cuda-python, no TensorRT, the CPU build of
onnxruntime) is skipped with the reason, and the rest still run; on a host without TensorRT the
bench runs the onnx backend only and says so. Verdict: ``pass`` (every step passed),
``pass_without_tensorrt`` (every step that could run passed, TensorRT absent), ``fail``, or
``nothing_to_check`` (no CUDA device). Exit code 0 for the two passes, 1 for fail, 2 otherwise.

This file is a tool of the repository (it runs its GPU tests), not part of the ``engines`` library.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REPORT_FORMAT = 1
NEEDS_TEXT = {
    "cuda_device": "no CUDA device is visible",
    "cuda_python": "cuda-python is not installed",
    "tensorrt": "TensorRT is not installed",
    "onnxruntime_gpu": "the onnxruntime in charge is the CPU build",
}


@dataclass(frozen=True)
class Step:
    name: str
    needs: tuple[str, ...]
    timeout_s: float
    min_s: float  # not started with less than this left in the budget
    what: str


STEPS = (
    Step("facts", (), 60, 5, "driver, devices, versions"),
    Step("cuda_python", ("cuda_device", "cuda_python"), 120, 20, "cuda-python GPU tests"),
    Step("onnx_parse", ("cuda_device", "cuda_python", "tensorrt"), 120, 20,
         "fp32/fp16/int8 graphs through TensorRT's ONNX parser"),
    Step("tensorrt_backend", ("cuda_device", "cuda_python", "tensorrt"), 330, 60,
         "TensorRT backend GPU tests on synthetic:mobilefacenet"),
    Step("fp16_is_fp16", ("cuda_device", "cuda_python", "tensorrt"), 150, 30,
         "layer precisions and speed of the fp16 plan against the fp32 one"),
    Step("cuda_ep", ("cuda_device", "onnxruntime_gpu"), 90, 15, "a real CUDA EP session"),
    Step("bench", ("cuda_device", "onnxruntime_gpu"), 240, 45,
         "arcface bench --backends onnx,tensorrt at batch 32 with device memory"),
)
STEP_NAMES = tuple(s.name for s in STEPS)


@dataclass
class StepResult:
    name: str
    status: str  # passed | failed | skipped
    seconds: float = 0.0
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


# -- the parts that need no GPU (tested on CPU) ----------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "gpu-check",
                        help="report directory (report.json, step logs, plan cache); default out/gpu-check")
    parser.add_argument("--steps", type=_step_list, default=list(STEP_NAMES),
                        help=f"comma-separated subset of {','.join(STEP_NAMES)} (default: all)")
    parser.add_argument("--budget-s", type=_positive_float, default=600.0,
                        help="total seconds for all steps (default 600); no step starts short of its minimum")
    parser.add_argument("--model", default="synthetic:mobilefacenet",
                        help="model of the parse, fp16 and bench steps (default synthetic:mobilefacenet)")
    parser.add_argument("--batch-size", type=_positive_int, default=32,
                        help="bench and speed batch (default 32)")
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument("--run-step", choices=STEP_NAMES, help=argparse.SUPPRESS)  # one step, in a child
    return parser.parse_args(argv)


def _step_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in STEP_NAMES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"steps are {','.join(STEP_NAMES)}; got {text!r}")
    return [n for n in STEP_NAMES if n in names]  # always in the documented order


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a positive number of seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a positive integer, got {text!r}")
    return int(text)


def skip_reason(step: Step, capabilities: dict[str, bool], remaining_s: float) -> str | None:
    """Why ``step`` does not run on this host (None: it runs)."""
    missing = [NEEDS_TEXT[n] for n in step.needs if not capabilities.get(n)]
    if missing:
        return "; ".join(missing)
    if remaining_s < step.min_s:
        return (f"out of time: {remaining_s:.0f} s of the budget left, the step needs at least "
                f"{step.min_s:.0f} s")
    return None


def verdict(results: list[StepResult], capabilities: dict[str, bool]) -> str:
    if not capabilities.get("cuda_device"):
        return "nothing_to_check"
    if any(r.status == "failed" for r in results):
        return "fail"
    ran = [r for r in results if r.status == "passed"]
    skipped = [r for r in results if r.status == "skipped"]
    if not ran:
        return "fail"
    only_trt = all(r.reason and NEEDS_TEXT["tensorrt"] in r.reason and "out of time" not in r.reason
                   for r in skipped)
    if not skipped:
        return "pass"
    return "pass_without_tensorrt" if only_trt and not capabilities.get("tensorrt") else "fail"


EXIT_CODES = {"pass": 0, "pass_without_tensorrt": 0, "fail": 1, "nothing_to_check": 2}


def write_report(out: Path, report: dict[str, Any]) -> Path:
    """``<out>/report.json``, written atomically (a half-written report is never read)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)
    return path


def junit_counts(path: Path) -> dict[str, Any]:
    """Totals of a pytest ``--junitxml`` file, and the names of the tests that failed or skipped."""
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    out: dict[str, Any] = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skips": []}
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            out["failed"] += 1
            node = case.find("failure") if case.find("failure") is not None else case.find("error")
            out["failures"].append(f"{name}: {(node.get('message') or '')[:300]}")
        elif case.find("skipped") is not None:
            out["skipped"] += 1
            out["skips"].append(f"{name}: {(case.find('skipped').get('message') or '')[:200]}")
        else:
            out["passed"] += 1
    return out


def pytest_status(counts: dict[str, Any]) -> tuple[str, str | None]:
    if counts["failed"]:
        return "failed", f"{counts['failed']} test(s) failed"
    if not counts["passed"]:
        return "skipped", "every test skipped: " + "; ".join(counts["skips"][:3])
    return "passed", None


def capabilities() -> dict[str, bool]:
    """What this host has, without initialising CUDA in this process (the steps do that)."""
    sys.path.insert(0, str(ROOT))
    from engines.hardware import has_cuda
    from engines.tensorrt.runtime import cuda_python_installed, tensorrt_installed

    try:
        import onnxruntime as ort

        ort_gpu = ort.get_device() == "GPU"
    except ImportError:
        ort_gpu = False
    return {"cuda_device": has_cuda(), "cuda_python": cuda_python_installed(),
            "tensorrt": tensorrt_installed(), "onnxruntime_gpu": ort_gpu}


# -- the steps (each runs in its own process: python gpu_check.py --run-step NAME) -----------------


def _env(args: argparse.Namespace) -> dict[str, str]:
    cache = str((args.out / "cache").resolve())
    return {**os.environ, "ARCFACE_CACHE_DIR": cache, "ARCFACE_TENSORRT__STORAGE__CACHE_DIR": cache,
            "ARCFACE_TENSORRT__STORAGE__TYPE": "local", "PYTHONUNBUFFERED": "1"}


def _run_pytest(args: argparse.Namespace, name: str, target: list[str], timeout: float) -> StepResult:
    junit = args.out / f"{name}.junit.xml"
    log = args.out / f"{name}.log"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-s", "-q",
           f"--junitxml={junit}", *target]
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(args), stdout=fh, stderr=subprocess.STDOUT,
                              timeout=timeout)
    if not junit.exists():
        return StepResult(name, "failed",
                          reason=f"pytest exited {proc.returncode} without a report; see {log}")
    counts = junit_counts(junit)
    status, reason = pytest_status(counts)
    return StepResult(name, status, reason=reason, details={**counts, "log": str(log)})


def step_facts(args: argparse.Namespace) -> StepResult:
    from engines.gpu_stack import gather_facts
    from engines.hardware import cuda_device_count

    facts = asdict(gather_facts(session_check=False))
    details: dict[str, Any] = {"stack": facts, "python": sys.version.split()[0],
                               "platform": platform.platform()}
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "--query-gpu=index,name,compute_cap,memory.total,driver_version"
        proc = subprocess.run([smi, query, "--format=csv,noheader"], capture_output=True, text=True,
                              timeout=30)
        answer = proc.stdout.strip().splitlines() if proc.returncode == 0 else proc.stderr.strip()
        details["nvidia_smi"] = answer
    if facts["cuda_python_version"] and cuda_device_count():
        from engines.tensorrt import cuda as cuda_rt

        details["devices"] = [asdict(cuda_rt.device_facts(i)) for i in range(cuda_device_count())]
    return StepResult("facts", "passed", details=details)


def step_cuda_python(args: argparse.Namespace, timeout: float) -> StepResult:
    return _run_pytest(args, "cuda_python", ["tests/gpu/test_cuda_rt.py"], timeout)


def step_tensorrt_backend(args: argparse.Namespace, timeout: float) -> StepResult:
    return _run_pytest(args, "tensorrt_backend",
                       ["tests/gpu/test_tensorrt_backend.py", "-k", "not iresnet50 and not r50"], timeout)


def step_onnx_parse(args: argparse.Namespace) -> StepResult:
    from engines import load_config, resolve_model
    from engines.models.precision import convert_model
    from engines.tensorrt.builder import parse_only

    cfg = load_config()
    model = resolve_model(args.model, cache_dir=cfg.storage.cache_dir)
    graphs = {"fp32": model}
    for precision in ("fp16", "int8"):
        graphs[precision] = convert_model(model, precision, cache_dir=cfg.storage.cache_dir,
                                          quantization=cfg.quantization)
    details, failed = {}, []
    for precision, graph in graphs.items():
        try:
            details[precision] = {"graph": graph.path, **parse_only(graph.path)}
        except Exception as exc:  # a parse refusal is this step's finding
            details[precision] = {"graph": graph.path, "error": f"{type(exc).__name__}: {exc}"}
            failed.append(precision)
    reason = f"TensorRT's parser refused {failed}" if failed else None
    return StepResult("onnx_parse", "failed" if failed else "passed", reason=reason, details=details)


def _faces_per_s(engine: Any, faces: Any, rounds: int = 5) -> float:
    engine.encode(faces)  # warm
    started = time.perf_counter()
    for _ in range(rounds):
        engine.encode(faces)
    return rounds * len(faces) / (time.perf_counter() - started)


def step_fp16_is_fp16(args: argparse.Namespace) -> StepResult:
    from engines import get_engine, load_config, resolve_model
    from engines.models.sample_faces import jittered_faces

    cfg = load_config()
    model = resolve_model(args.model, cache_dir=cfg.storage.cache_dir)
    faces = jittered_faces(args.batch_size, seed=7).faces
    device = f"cuda:{args.device_id}"
    details: dict[str, Any] = {}
    for precision in ("fp32", "fp16"):
        engine = get_engine("tensorrt", model, precision=precision, device=device, config=cfg)
        try:
            details[precision] = {"layer_output_dtypes": engine.layer_precisions(),
                                  "faces_per_s": round(_faces_per_s(engine, faces), 1),
                                  "plan": engine.info.runtime["tensorrt"]["engine_key"]}
        finally:
            engine.close()
    p16, p32 = details["fp16"]["layer_output_dtypes"], details["fp32"]["layer_output_dtypes"]
    half = p16.get("fp16", 0) + p16.get("bf16", 0)
    share = half / max(1, half + p16.get("fp32", 0))
    details["fp16_share_of_float_layers"] = round(share, 3)
    speedup = details["fp16"]["faces_per_s"] / details["fp32"]["faces_per_s"]
    details["speedup_fp16_vs_fp32"] = round(speedup, 2)
    problems = []
    if share < 0.5:
        problems.append(f"only {share:.0%} of the fp16 plan's float layers compute in 16 bits")
    if p32.get("fp16", 0) or p32.get("bf16", 0):
        problems.append("the fp32 plan has 16-bit layers")
    return StepResult("fp16_is_fp16", "failed" if problems else "passed", reason="; ".join(problems) or None,
                      details=details)


def step_cuda_ep(args: argparse.Namespace, tensorrt: bool, timeout: float) -> StepResult:
    cmd = [sys.executable, "-m", "engines.gpu_stack", "--json", "--device-id", str(args.device_id)]
    if not tensorrt:
        cmd.append("--without-tensorrt")
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(args), capture_output=True, text=True, timeout=timeout)
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        return StepResult("cuda_ep", "failed",
                          reason=f"gpu_stack exited {proc.returncode}: {proc.stderr[-500:]}")
    active = out["facts"]["session_providers"] or []
    ok = proc.returncode == 0 and "CUDAExecutionProvider" in active
    reason = None if ok else "; ".join(out["problems"]) or f"session providers {active}"
    return StepResult("cuda_ep", "passed" if ok else "failed", reason=reason, details=out)


def step_bench(args: argparse.Namespace, tensorrt: bool, timeout: float) -> StepResult:
    backends = "onnx,tensorrt" if tensorrt else "onnx"
    cmd = [sys.executable, "-m", "engines", "--log-level", "WARNING", "bench", "--backends", backends,
           "--model", args.model, "--batch-size", str(args.batch_size),
           "--num-faces", str(8 * args.batch_size), "--rounds", "2", "--device", f"cuda:{args.device_id}",
           "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(args), capture_output=True, text=True, timeout=timeout)
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return StepResult("bench", "failed",
                          reason=f"arcface bench exited {proc.returncode}: {proc.stderr[-500:]}")
    rows = out["results"]
    problems = [f"{r['backend']}: {r['error']}" for r in rows if r["error"]]
    problems += [f"{r['backend']}: memory measured as {r['mem_kind']}, not device" for r in rows
                 if not r["error"] and r["mem_kind"] != "device"]
    details = {"command": " ".join(cmd[1:]), "results": rows}
    if not tensorrt:
        details["skipped"] = "the tensorrt backend (TensorRT is not installed)"
    return StepResult("bench", "failed" if problems else "passed", reason="; ".join(problems) or None,
                      details=details)


def run_step(args: argparse.Namespace, name: str, tensorrt: bool, timeout: float) -> StepResult:
    """One step in this process (the child): the dispatch table of ``--run-step``."""
    table: dict[str, Callable[[], StepResult]] = {
        "facts": lambda: step_facts(args),
        "cuda_python": lambda: step_cuda_python(args, timeout),
        "onnx_parse": lambda: step_onnx_parse(args),
        "tensorrt_backend": lambda: step_tensorrt_backend(args, timeout),
        "fp16_is_fp16": lambda: step_fp16_is_fp16(args),
        "cuda_ep": lambda: step_cuda_ep(args, tensorrt, timeout),
        "bench": lambda: step_bench(args, tensorrt, timeout),
    }
    return table[name]()


def _child(args: argparse.Namespace, step: Step, tensorrt: bool, timeout: float) -> StepResult:
    """Run ``step`` in a fresh process (CUDA state, a crash and a hang stay there)."""
    result_path = args.out / f"{step.name}.result.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-step", step.name, "--out", str(args.out),
           "--model", args.model, "--batch-size", str(args.batch_size), "--device-id", str(args.device_id),
           "--budget-s", str(timeout)]
    log = args.out / f"{step.name}.step.log"
    try:
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, cwd=ROOT, env=_env(args), stdout=fh, stderr=subprocess.STDOUT,
                                  timeout=timeout + 15)
    except subprocess.TimeoutExpired:
        return StepResult(step.name, "failed", reason=f"timed out after {timeout:.0f} s; see {log}")
    if not result_path.exists():
        tail = log.read_text()[-800:] if log.exists() else ""
        return StepResult(step.name, "failed",
                          reason=f"the step exited {proc.returncode} with no result: {tail}")
    return StepResult(**json.loads(result_path.read_text()))


def run_all(args: argparse.Namespace, caps: dict[str, bool] | None = None) -> tuple[dict[str, Any], int]:
    caps = capabilities() if caps is None else caps
    started, wall = datetime.now(timezone.utc), time.monotonic()
    deadline = wall + args.budget_s
    results: list[StepResult] = []
    for step in STEPS:
        if step.name not in args.steps:
            continue
        remaining = deadline - time.monotonic()
        why = skip_reason(step, caps, remaining)
        if why is not None:
            results.append(StepResult(step.name, "skipped", reason=why))
            print(f"[gpu-check] {step.name}: skipped ({why})", flush=True)
            continue
        print(f"[gpu-check] {step.name}: {step.what} ...", flush=True)
        began = time.monotonic()
        result = _child(args, step, caps["tensorrt"], min(step.timeout_s, remaining))
        result.seconds = round(time.monotonic() - began, 1)
        results.append(result)
        print(f"[gpu-check] {step.name}: {result.status} in {result.seconds:.0f} s"
              + (f" ({result.reason})" if result.reason else ""), flush=True)
    outcome = verdict(results, caps)
    report = {
        "report_format": REPORT_FORMAT, "verdict": outcome,
        "started_at": started.isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - wall, 1), "budget_s": args.budget_s,
        "capabilities": caps, "model": args.model, "batch_size": args.batch_size,
        "steps": [asdict(r) for r in results],
        "skipped": {r.name: r.reason for r in results if r.status == "skipped"},
    }
    path = write_report(args.out, report)
    print(f"[gpu-check] verdict {outcome}; report {path}", flush=True)
    return report, EXIT_CODES[outcome]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.run_step:
        sys.path.insert(0, str(ROOT))
        caps = capabilities()
        result = run_step(args, args.run_step, caps["tensorrt"], args.budget_s)
        (args.out / f"{args.run_step}.result.json").write_text(json.dumps(asdict(result), default=str))
        return 0
    return run_all(args)[1]


if __name__ == "__main__":
    sys.exit(main())
