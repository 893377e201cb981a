"""Every engines module imports with the base dependencies alone, and none imports Ray."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import engines


def test_every_engines_module_imports_without_ray_or_gpu_packages():
    modules = sorted(m.name for m in pkgutil.iter_modules(engines.__path__, "engines."))
    code = (
        "import importlib, sys\n"
        f"mods = {modules!r}\n"
        "for m in mods:\n"
        "    if m != 'engines.__main__':\n"
        "        importlib.import_module(m)\n"
        "heavy = [m for m in ('ray', 'tensorrt', 'cuda', 'torch') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"engines imported {out.stdout.strip()}"
    assert "engines.onnx_backend" in modules and "engines.cli" in modules
