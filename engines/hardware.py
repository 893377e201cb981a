"""What this host can run: CUDA devices and CPU vector extensions.

Detection never initialises CUDA in the calling process unless asked (a CUDA
context created before a fork is broken in the child, and Ray forks workers),
so ``cuda_device_count`` prefers driver-visible facts over a runtime call.
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path


def _visible_devices_env() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def cuda_device_count() -> int:
    """Number of CUDA devices this process may use, without creating a context.

    Ray sets ``CUDA_VISIBLE_DEVICES=""`` for actors with ``num_gpus=0``; that
    counts as no device even on a GPU host.
    """
    visible = _visible_devices_env()
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        return 0
    gpus = Path("/proc/driver/nvidia/gpus")
    present = len(list(gpus.iterdir())) if gpus.is_dir() else 0
    if present == 0:
        return 0
    if visible is not None:
        return min(present, len([v for v in visible.split(",") if v.strip()]))
    return present


def has_cuda() -> bool:
    return cuda_device_count() > 0


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda:0`` when a device is visible, else ``cpu``; others validated."""
    device = (device or "auto").strip().lower()
    if device == "auto":
        return "cuda:0" if has_cuda() else "cpu"
    if device == "cuda":
        return "cuda:0"
    if device == "cpu" or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")


def device_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty set where unavailable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name, for a measurement's record. A virtual machine's can be generic ("AMD
    EPYC" on Zen 3, 4 and 5 alike): with no digit in it, the family and model numbers are added,
    which tell those apart."""
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    if not any(c.isdigit() for c in name) and fields.get("cpu family") and fields.get("model"):
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def cpu_has_bf16() -> bool:
    """Native bf16 matrix instructions: AMX-BF16 (Intel) or AVX512-BF16 (Intel, AMD Zen 4+)."""
    flags = cpu_flags()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_has_fp16() -> bool:
    """Native fp16 arithmetic: AMX-FP16 or AVX512-FP16 (Intel Sapphire Rapids and later)."""
    flags = cpu_flags()
    return "amx_fp16" in flags or "avx512_fp16" in flags


def cpu_has_int8_dot() -> bool:
    """Native int8 dot products: AMX-INT8, AVX512-VNNI or AVX-VNNI."""
    flags = cpu_flags()
    return bool({"amx_int8", "avx512_vnni", "avx_vnni"} & flags)


def cpu_summary() -> dict[str, object]:
    flags = cpu_flags()
    return {
        "model": cpu_model_name(),
        "logical_cpus": os.cpu_count(),
        "amx": sorted(f for f in flags if f.startswith("amx")),
        "avx512_bf16": "avx512_bf16" in flags,
        "avx512_vnni": "avx512_vnni" in flags,
        "avx512_fp16": "avx512_fp16" in flags,
        "avx512f": "avx512f" in flags,
    }
