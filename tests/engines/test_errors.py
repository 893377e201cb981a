"""The "install the extra" hints name extras that exist and packages they really provide."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import engines
from engines.errors import missing_extra

ROOT = Path(engines.__file__).resolve().parent.parent


def _dist(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


def _project() -> tuple[set[str], dict[str, set[str]]]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_dist(r) for r in project["dependencies"]}
    extras = {name: {_dist(r) for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    for name, reqs in project["optional-dependencies"].items():  # "arcface-ray[cuda]": an extra of ours
        for req in reqs:
            if _dist(req) == project["name"]:
                for inner in re.findall(r"\[([^\]]+)\]", req)[0].split(","):
                    extras[name] |= extras[inner.strip()]
                extras[name].discard(project["name"])
    return base, extras


def _missing_extra_calls():
    """Every install hint in engines/ (subpackages included): ``missing_extra("pkg", extra, ...)``
    calls with literal arguments, and backends' ``required_package = "pkg"``, which
    ``BaseEngine._require_package`` turns into the base-dependency hint."""
    for path in sorted((ROOT / "engines").rglob("*.py")):
        where = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "missing_extra":
                if all(isinstance(arg, ast.Constant) for arg in node.args[:2]):
                    package, extra = (ast.literal_eval(arg) for arg in node.args[:2])
                    yield f"{where}:{node.lineno}", package, extra
            elif (isinstance(node, ast.Assign) and len(node.targets) == 1
                  and getattr(node.targets[0], "id", None) == "required_package"
                  and isinstance(node.value, ast.Constant) and node.value.value):
                yield f"{where}:{node.lineno}", node.value.value, None


def test_every_hint_names_the_extra_that_provides_the_package():
    base, extras = _project()
    calls = list(_missing_extra_calls())
    assert len(calls) >= 4
    for where, package, extra in calls:
        if extra is None:
            assert package in base, f"{where}: {package} is not a base dependency; name its extra"
        else:
            assert extra in extras, f"{where}: no extra [{extra}] in pyproject.toml"
            assert package in extras[extra], f"{where}: [{extra}] does not install {package}"
            assert package not in base, f"{where}: {package} is a base dependency, not an extra"


@pytest.mark.parametrize(
    ("module", "cls"),
    [("engines.backends.onnx", "OnnxEngine"), ("engines.backends.openvino", "OpenVinoEngine"),
     ("engines.backends.insightface", "InsightFaceEngine")],
)
def test_a_missing_base_dependency_says_reinstall(module, cls, mbf_model, monkeypatch):
    import importlib

    from engines.base import EngineOptions
    from engines.errors import BackendUnavailable

    engine_cls = getattr(importlib.import_module(module), cls)
    monkeypatch.setattr(engine_cls, "availability", classmethod(lambda c: "not installed (test)"))
    with pytest.raises(BackendUnavailable) as info:
        engine_cls(mbf_model, EngineOptions()).ensure_ready()
    message = str(info.value)
    assert "reinstall the project: pip install -e ." in message and "arcface-ray[" not in message


def test_an_optional_package_names_its_extra():
    message = str(missing_extra("tensorrt", "gpu", "building engines"))
    assert "pip install 'arcface-ray[gpu]'" in message and "building engines" in message
