"""The binding side of the conformance check: types, signatures and argument compatibility.

``Binding`` wraps the one real binding importable in this process (``tensorrt_bindings`` of one
TensorRT major, or ``cuda.bindings.runtime``): classes by path, pybind11 signatures parsed from
docstrings (overloads included), cuda-python's from ``inspect.signature`` and its numpydoc
``Returns`` sections, property types and setters. ``_fits`` says whether a call's arguments fit
one signature. Used by ``api_conformance.py``; names and signatures only, nothing is called.
"""

from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any

LITERALS = ("int", "float", "str", "bytes", "bool", "None", "tuple", "list")


@dataclass(frozen=True)
class T:
    """An inferred type: ``kind`` module | class | inst | func | method | result | tuple | lit | local."""

    kind: str
    path: tuple[str, ...] = ()
    items: tuple[Any, ...] = ()
    local: Any = None  # ClassInfo for a class of ours derived from a binding class

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"T({self.kind}:{'.'.join(self.path)})"


class Binding:
    """The binding under test: the module, its classes by path, signatures from docstrings."""

    def __init__(self, family: str) -> None:
        self.family = family
        name = "tensorrt_bindings" if family == "tensorrt" else "cuda.bindings.runtime"
        self.module = importlib.import_module(name)
        self.version = str(getattr(self.module, "__version__", "")) or _dist_version(family)
        self.class_paths: dict[type, tuple[str, ...]] = {}
        for attr in dir(self.module):
            obj = getattr(self.module, attr, None)
            if isinstance(obj, type):
                self.class_paths.setdefault(obj, (attr,))
                for inner, value in vars(obj).items():
                    if isinstance(value, type):
                        self.class_paths.setdefault(value, (attr, inner))

    def resolve(self, path: tuple[str, ...]) -> Any:
        obj = self.module
        for part in path:
            obj = getattr(obj, part)
        return obj

    def type_of_object(self, obj: Any, path: tuple[str, ...]) -> T | None:
        if inspect.ismodule(obj):
            return T("module", path)
        if isinstance(obj, type):
            return T("class", self.class_paths.get(obj, path))
        if callable(obj) and not isinstance(obj, type):
            return T("func", path)
        cls = self.class_paths.get(type(obj))
        if cls is not None:
            return T("inst", cls)
        return _literal(obj)

    def type_from_annotation(self, text: str) -> T | None:
        """``tensorrt_bindings.tensorrt.ITensor`` / ``:py:obj:`~.cudaDeviceProp``` / ``int`` -> a type."""
        text = text.strip()
        if text in LITERALS:
            return T("lit", (text,))
        if text in ("typing.SupportsInt", "SupportsInt"):
            return T("lit", ("int",))
        if text in ("typing.SupportsFloat", "SupportsFloat"):
            return T("lit", ("float",))
        match = re.fullmatch(r"(?:tensorrt_bindings|tensorrt)\.tensorrt\.([\w.]+)", text) or re.fullmatch(
            r":py:obj:`~\.(\w+)`", text) or re.fullmatch(r"(\w+)", text)
        if match:
            try:
                obj = self.resolve(tuple(match.group(1).split(".")))
            except AttributeError:
                return None
            if isinstance(obj, type):
                return T("inst", self.class_paths.get(obj, tuple(match.group(1).split("."))))
        return None

    def signatures(self, obj: Any, name: str) -> list[dict[str, Any]] | None:
        """Overloads of a callable: ``[{params: [(name, annotation, has_default, kind)], returns}]``."""
        doc = getattr(obj, "__doc__", None) or ""
        overloads = []
        for line in doc.splitlines():
            pattern = rf"^\s*(?:\d+\.\s+)?(?:[\w.]+\.)?{re.escape(name)}\((.*)\)\s*->\s*(.+?)\s*$"
            match = re.match(pattern, line)
            if match and match.group(1) != "*args, **kwargs":
                overloads.append({"params": _split_params(match.group(1)), "returns": match.group(2)})
        if overloads:
            return overloads
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            return None
        params = []
        for p in sig.parameters.values():
            annotation = "" if p.annotation is inspect.Parameter.empty else str(p.annotation)
            params.append((p.name, annotation, p.default is not inspect.Parameter.empty, p.kind.name))
        return [{"params": params, "returns": _numpydoc_returns(doc)}]

    def property_return(self, prop: property) -> T | None:
        doc = (prop.fget.__doc__ or "") if prop.fget else ""
        match = re.search(r"->\s*(.+?)\s*$", doc.splitlines()[0] if doc else "")
        return self.type_from_annotation(match.group(1)) if match else None

    def returns(self, text: Any) -> T | None:
        if isinstance(text, list):  # cuda-python: (cudaError_t, value, ...)
            return T("result", (), tuple(self.type_from_annotation(t) if t else None for t in text))
        return self.type_from_annotation(str(text)) if text else None


def _dist_version(family: str) -> str:
    import importlib.metadata as md

    dists = ("cuda-bindings",) if family == "cuda" else ("tensorrt-cu13-bindings", "tensorrt-cu12-bindings")
    for dist in dists:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return "unknown"


def _literal(obj: Any) -> T | None:
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str), ("bytes", bytes),
                       ("tuple", tuple), ("list", list)):
        if isinstance(obj, kind):
            return T("lit", (name,))
    return T("lit", ("None",)) if obj is None else None


def _split_params(text: str) -> list[tuple[str, str, bool, str]]:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "([<{":
            depth += 1
        elif ch in ")]>}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    params = []
    for part in parts:
        part = part.strip()
        if part.startswith("**"):
            params.append((part[2:].split(":")[0], "", True, "VAR_KEYWORD"))
            continue
        if part.startswith("*"):
            params.append((part[1:].split(":")[0], "", True, "VAR_POSITIONAL"))
            continue
        head, _, default = part.partition("=")
        pname, _, annotation = head.partition(":")
        params.append((pname.strip(), annotation.strip(), bool(default.strip()), "POSITIONAL_OR_KEYWORD"))
    return params


def _numpydoc_returns(doc: str) -> list[str] | None:
    """cuda-python docstrings: ``Returns\n-------\ncudaError_t\n    ...\nprop : :py:obj:`~.X```."""
    lines = doc.splitlines()
    for start, line in enumerate(lines[:-1]):
        if line.strip() == "Returns" and set(lines[start + 1].strip()) == {"-"}:
            break
    else:
        return None
    out = []
    body = lines[start + 2:]
    for i, line in enumerate(body):
        if i + 1 < len(body) and body[i + 1].strip() and set(body[i + 1].strip()) == {"-"}:
            break  # the next section's title
        if not line.strip() or line.startswith(" "):
            continue
        out.append(line.split(" : ", 1)[1].strip() if " : " in line else line.strip())
    return out


def _is_member(obj: Any) -> bool:
    """An enum member or other instance reached through a class (not a method)."""
    routine_types = ("instancemethod", "builtin_function_or_method")
    return not (inspect.isroutine(obj) or type(obj).__name__ in routine_types)


def _subclass(binding: Binding, child: tuple[str, ...], parent: tuple[str, ...]) -> bool:
    try:
        return issubclass(binding.resolve(child), binding.resolve(parent))
    except (AttributeError, TypeError):
        return child == parent


def _compatible(arg: T | None, annotation: str, binding: Binding) -> str | None:
    """Why ``arg`` cannot be passed where ``annotation`` is declared (None: it can, or unknown)."""
    if arg is None or not annotation:
        return None
    if "None" in annotation or "Optional" in annotation or annotation in ("object", "typing.Any"):
        return None
    wanted = binding.type_from_annotation(annotation)
    given = "None" if arg == T("lit", ("None",)) else None
    if given == "None":
        return f"None for {annotation}"
    if wanted is None:
        buffer = annotation in ("buffer", "typing_extensions.Buffer")
        if buffer and arg.kind == "lit" and arg.path[0] == "str":
            return f"a str for {annotation}"
        return None
    if wanted.kind == "lit":
        if arg.kind == "lit":
            ok = {"int": ("int", "bool"), "float": ("int", "float", "bool"), "str": ("str",),
                  "bool": ("bool", "int"), "tuple": ("tuple", "list"), "list": ("tuple", "list"),
                  "bytes": ("bytes",)}.get(wanted.path[0], LITERALS)
            return None if arg.path[0] in ok else f"a {arg.path[0]} for {annotation}"
        return None
    if arg.kind == "local":
        return None if any(_subclass(binding, b.path, wanted.path) for b in arg.local.bases) else \
            f"our {arg.local.name} for {'.'.join(wanted.path)}"
    if arg.kind == "inst":
        return None if _subclass(binding, arg.path, wanted.path) else \
            f"{'.'.join(arg.path)} for {'.'.join(wanted.path)}"
    if arg.kind == "lit" and arg.path[0] in ("str", "bytes", "bool", "float"):
        return f"a {arg.path[0]} for {'.'.join(wanted.path)}"
    return None  # tuples convert to Dims, ints to enums where pybind allows: not judged here


def _fits(params: list, args: list, kwargs: dict, binding: Binding) -> str | None:
    positional = [p for p in params if p[3] in ("POSITIONAL_OR_KEYWORD", "POSITIONAL_ONLY")]
    var_pos = any(p[3] == "VAR_POSITIONAL" for p in params)
    var_kw = any(p[3] == "VAR_KEYWORD" for p in params)
    if len(args) > len(positional) and not var_pos:
        return f"{len(args)} positional argument(s) for {len(positional)}"
    names = [p[0] for p in params]
    for key in kwargs:
        if key not in names and not var_kw:
            return f"no keyword {key!r} (has {names})"
    covered = {p[0] for p in positional[:len(args)]} | set(kwargs)
    missing = [p[0] for p in params if p[3] in ("POSITIONAL_OR_KEYWORD", "POSITIONAL_ONLY", "KEYWORD_ONLY")
               and not p[2] and p[0] not in covered]
    if missing:
        return f"missing {missing}"
    for param, arg in zip(positional, args, strict=False):
        why = _compatible(arg, param[1], binding)
        if why:
            return f"{param[0]}: {why}"
    by_name = {p[0]: p for p in params}
    for key, arg in kwargs.items():
        if key in by_name:
            why = _compatible(arg, by_name[key][1], binding)
            if why:
                return f"{key}: {why}"
    return None
