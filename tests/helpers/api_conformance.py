"""Names and signatures the code uses, checked against one real binding. Run in a subprocess.

    python api_conformance.py --family tensorrt --root REPO [SOURCE ...]   # tensorrt_bindings on the path
    python api_conformance.py --family cuda --root REPO [SOURCE ...]       # cuda.bindings on the path

It walks the sources' syntax trees (never imports them), infers which values are
TensorRT or cuda-python objects, and checks every attribute read, attribute write,
call (positional count, keyword names, argument types where they are known),
subclass and override of those objects against the binding that is importable in
this process: the real ``tensorrt_bindings`` of one major version (imported against
the stand-in libraries of ``trt_standins/``) or the real ``cuda.bindings.runtime``.
It prints one JSON object: every usage with ``ok`` and ``problem``, and whether it
is ``guarded`` (inside ``if hasattr(x, ...)`` or a three-argument ``getattr``: such a
name need exist in one version only). Names and signatures only: nothing is run.

What makes a value typed (the seeds): a call of ``import_tensorrt()`` or ``import
tensorrt`` (tensorrt family); a call of ``cudart()`` or ``from cuda.bindings import
runtime`` / ``from cuda import cudart`` (cuda family). Types then flow through
assignments, tuple unpacking, ``self.x`` attributes, function parameters (from the
call sites of the walked code), return values, the binding's own docstring return
types, and ``check(result)`` (cuda.py's unwrapper of cuda-python result tuples).

This module is the walk (type inference); ``api_bindings`` reads the binding (signatures,
property types, argument compatibility) and ``api_checks`` records and judges each use.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api_bindings import Binding, T, _literal
from api_checks import Checks, Usage, _src

UNWRAPPERS = {"check"}  # engines/tensorrt/cuda.py: (err, *values) -> values


@dataclass(eq=False)
class ClassInfo:
    name: str
    node: ast.ClassDef
    scope: Scope
    bases: list[T] = field(default_factory=list)
    attrs: dict[str, T | None] = field(default_factory=dict)  # self.x = ...
    methods: dict[str, ast.FunctionDef] = field(default_factory=dict)


@dataclass(eq=False)
class Scope:
    """A module, or a function (its parent scope is where it was defined)."""

    module: str
    node: ast.AST
    parent: Scope | None = None
    cls: ClassInfo | None = None  # for a method: its class
    vars: dict[str, T] = field(default_factory=dict)
    funcs: dict[str, ast.FunctionDef] = field(default_factory=dict)  # functions defined in this scope


# -- the walk ------------------------------------------------------------------------------------


class Walker(Checks):
    def __init__(self, binding: Binding, root: Path, files: list[Path]) -> None:
        self.b = binding
        self.root = root
        self.trees = {_relative(f, root): ast.parse(f.read_text(), str(f)) for f in files}
        self.scopes: dict[int, Scope] = {}
        self.module_scopes: dict[str, Scope] = {}
        self.functions: dict[str, list[tuple[ast.FunctionDef, Scope]]] = {}  # module-level, by name
        self.classes: dict[int, ClassInfo] = {}
        self.returns: dict[int, T] = {}
        self.module_dicts: dict[tuple[str, str], list[str]] = {}
        self.usages: dict[tuple[str, int, int, str], Usage] = {}
        self.changed = True
        self.final = False
        for module, tree in self.trees.items():
            scope = Scope(module, tree)
            self.module_scopes[module] = scope
            self._index(tree, scope, None)

    # -- indexing ---------------------------------------------------------------------
    def _index(self, node: ast.AST, scope: Scope, cls: ClassInfo | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = Scope(scope.module, child, parent=scope, cls=cls)
                self.scopes[id(child)] = inner
                if cls is not None:
                    cls.methods[child.name] = child
                elif isinstance(node, ast.Module):
                    self.functions.setdefault(child.name, []).append((child, inner))
                else:
                    scope.funcs[child.name] = child
                self._index(child, inner, None)
            elif isinstance(child, ast.ClassDef):
                info = ClassInfo(child.name, child, scope)
                self.classes[id(child)] = info
                self._index(child, scope, info)
            else:
                if isinstance(child, ast.Assign) and isinstance(node, ast.Module) and isinstance(
                        child.value, ast.Dict):
                    values = [v.value for v in child.value.values if isinstance(v, ast.Constant)]
                    if all(isinstance(v, str) for v in values) and values:
                        for target in child.targets:
                            if isinstance(target, ast.Name):
                                self.module_dicts[(scope.module, target.id)] = values
                self._index(child, scope, cls)

    # -- running ---------------------------------------------------------------------
    def run(self) -> list[Usage]:
        for _ in range(12):
            if not self.changed:
                break
            self.changed = False
            self._pass()
        self.final = True
        self._pass()
        return list(self.usages.values())

    def _pass(self) -> None:
        for module, tree in self.trees.items():
            self._block(tree.body, self.module_scopes[module], ())

    def _block(self, body: list[ast.stmt], scope: Scope, guards: tuple) -> None:
        for stmt in body:
            self._stmt(stmt, scope, guards)

    def _stmt(self, stmt: ast.stmt, scope: Scope, guards: tuple) -> None:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner = self.scopes[id(stmt)]
            self._method_params(stmt, inner)
            self._block(stmt.body, inner, ())
            return
        if isinstance(stmt, ast.ClassDef):
            info = self.classes[id(stmt)]
            info.bases = [t for t in (self.expr(b, scope, guards) for b in stmt.bases) if t is not None
                          and t.kind == "class"]
            for base in info.bases:
                self._use(scope, stmt, f"class {stmt.name}({'.'.join(base.path)})", ".".join(base.path),
                          "subclass", guards, None)
                for name, method in info.methods.items():
                    if not name.startswith("__"):
                        self._check_override(scope, method, base, name, guards)
            for child in stmt.body:
                self._stmt(child, scope, guards)
            return
        if isinstance(stmt, ast.If):
            self.expr(stmt.test, scope, guards)
            inner = guards + self._hasattr_guards(stmt.test)
            self._block(stmt.body, scope, inner)
            self._block(stmt.orelse, scope, inner)
            return
        if isinstance(stmt, ast.Assign):
            value = self.expr(stmt.value, scope, guards)
            for target in stmt.targets:
                self._assign(target, value, stmt.value, scope, guards)
            return
        if isinstance(stmt, ast.AnnAssign):
            value = self.expr(stmt.value, scope, guards) if stmt.value else None
            if stmt.value is not None:
                self._assign(stmt.target, value, stmt.value, scope, guards)
            return
        if isinstance(stmt, ast.Return):
            if stmt.value is not None:
                value = self.expr(stmt.value, scope, guards)
                func = scope.node
                if _better(value, self.returns.get(id(func))):
                    self.returns[id(func)] = value
                    self.changed = True
            return
        if isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                value = self.expr(item.context_expr, scope, guards)
                if item.optional_vars is not None:
                    self._assign(item.optional_vars, value, item.context_expr, scope, guards)
            self._block(stmt.body, scope, guards)
            return
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            self._import(stmt, scope)
            return
        for child in ast.iter_child_nodes(stmt):
            if isinstance(child, ast.stmt):
                self._stmt(child, scope, guards)
            elif isinstance(child, ast.expr):
                self.expr(child, scope, guards)
            elif isinstance(child, ast.excepthandler):
                self._block(child.body, scope, guards)

    def _method_params(self, func: ast.FunctionDef, scope: Scope) -> None:
        """Parameters of a method overriding a binding method get that method's parameter types."""
        info = scope.cls
        if info is None or not info.bases:
            return
        for base in info.bases:
            obj = getattr(self.b.resolve(base.path), func.name, None)
            sigs = self.b.signatures(obj, func.name) if obj is not None else None
            if not sigs:
                continue
            for arg, (_, annotation, _, _) in zip(func.args.args, sigs[0]["params"], strict=False):
                typed = self.b.type_from_annotation(annotation)
                if typed is not None and arg.arg != "self":
                    self._set_var(scope, arg.arg, typed)

    def _import(self, stmt: ast.stmt, scope: Scope) -> None:
        if self.b.family == "tensorrt" and isinstance(stmt, ast.Import):
            for alias in stmt.names:
                if alias.name == "tensorrt":
                    self._set_var(scope, alias.asname or "tensorrt", T("module"))
        if self.b.family == "cuda" and isinstance(stmt, ast.ImportFrom):
            for alias in stmt.names:
                if (stmt.module, alias.name) in (("cuda.bindings", "runtime"), ("cuda", "cudart")):
                    self._set_var(scope, alias.asname or alias.name, T("module"))

    def _hasattr_guards(self, test: ast.expr) -> tuple:
        found = []
        for node in ast.walk(test):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr" \
                    and len(node.args) == 2:
                found.append(ast.dump(node.args[0]))
        return tuple(found)

    # -- variables -------------------------------------------------------------------
    def _set_var(self, scope: Scope, name: str, value: T | None) -> None:
        if _known(value) and _better(value, scope.vars.get(name)):
            scope.vars[name] = value
            self.changed = True

    def _lookup(self, scope: Scope | None, name: str) -> T | None:
        while scope is not None:
            if name in scope.vars:
                return scope.vars[name]
            scope = scope.parent
        return None

    def _self_class(self, scope: Scope | None) -> ClassInfo | None:
        while scope is not None:
            if scope.cls is not None:
                return scope.cls
            scope = scope.parent
        return None

    def _assign(self, target: ast.expr, value: T | None, source: ast.expr, scope: Scope,
                guards: tuple) -> None:
        if isinstance(target, ast.Name):
            self._set_var(scope, target.id, value)
        elif isinstance(target, (ast.Tuple, ast.List)):
            items: tuple = ()
            if value is not None and value.kind in ("tuple", "result"):
                items = value.items
            elif isinstance(source, (ast.Tuple, ast.List)):
                items = tuple(self.expr(e, scope, guards) for e in source.elts)
            for i, element in enumerate(target.elts):
                self._assign(element, items[i] if i < len(items) else None, element, scope, guards)
        elif isinstance(target, ast.Attribute):
            receiver = target.value
            if isinstance(receiver, ast.Name) and receiver.id == "self":
                info = self._self_class(scope)
                if info is not None and _known(value) and _better(value, info.attrs.get(target.attr)):
                    info.attrs[target.attr] = value
                    self.changed = True
                elif info is not None:
                    info.attrs.setdefault(target.attr, None)
                return
            owner = self.expr(receiver, scope, guards)
            if owner is not None and owner.kind == "inst" and owner.local is None:
                self._check_set(scope, target, owner, value, guards)

    # -- expressions -----------------------------------------------------------------
    def expr(self, node: ast.expr | None, scope: Scope, guards: tuple) -> T | None:
        if node is None:
            return None
        if isinstance(node, ast.Constant):
            return _literal(node.value)
        if isinstance(node, ast.Name):
            return self._lookup(scope, node.id)
        if isinstance(node, (ast.Tuple, ast.List)):
            items = tuple(self.expr(e, scope, guards) for e in node.elts)
            return T("tuple", (), items) if isinstance(node, ast.Tuple) else T("lit", ("list",))
        if isinstance(node, ast.Attribute):
            return self._attribute(node, scope, guards)
        if isinstance(node, ast.Call):
            return self._call(node, scope, guards)
        if isinstance(node, ast.Subscript):
            value = self.expr(node.value, scope, guards)
            self.expr(node.slice, scope, guards)
            index = node.slice.value if isinstance(node.slice, ast.Constant) else None
            if value is not None and value.kind in ("tuple", "result") and isinstance(index, int) \
                    and index < len(value.items):
                return value.items[node.slice.value]
            return None
        if isinstance(node, ast.IfExp):
            self.expr(node.test, scope, guards)
            inner = guards + self._hasattr_guards(node.test)
            a, b = self.expr(node.body, scope, inner), self.expr(node.orelse, scope, inner)
            return a or b
        if isinstance(node, ast.BoolOp):
            inner = guards
            for value in node.values:
                self.expr(value, scope, inner)
                inner = inner + self._hasattr_guards(value)
            return None
        if isinstance(node, ast.Lambda):
            return None
        if isinstance(node, ast.JoinedStr):
            for value in node.values:
                if isinstance(value, ast.FormattedValue):
                    self.expr(value.value, scope, guards)
            return T("lit", ("str",))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.expr(child, scope, guards)
            elif isinstance(child, ast.comprehension):
                self.expr(child.iter, scope, guards)
                for cond in child.ifs:
                    self.expr(cond, scope, guards)
        return None

    def _attribute(self, node: ast.Attribute, scope: Scope, guards: tuple) -> T | None:
        if isinstance(node.value, ast.Name) and node.value.id == "self":
            info = self._self_class(scope)
            if info is not None:
                if node.attr in info.attrs or node.attr in info.methods:
                    return info.attrs.get(node.attr)
                for base in info.bases:  # an inherited binding member
                    return self._check_member(scope, node, T("inst", base.path), node.attr, guards)
            return None
        owner = self.expr(node.value, scope, guards)
        if owner is None or owner.kind not in ("module", "class", "inst", "local"):
            return None
        if owner.kind == "local":
            info = owner.local
            if node.attr in info.attrs or node.attr in info.methods:
                return info.attrs.get(node.attr)
            if not info.bases:
                return None
            owner = T("inst", info.bases[0].path)
        return self._check_member(scope, node, owner, node.attr, guards)

    def _call(self, node: ast.Call, scope: Scope, guards: tuple) -> T | None:
        func = node.func
        name = func.id if isinstance(func, ast.Name) else (
            func.attr if isinstance(func, ast.Attribute) else None)
        if name == "getattr" and isinstance(func, ast.Name) and len(node.args) >= 2:
            return self._getattr(node, scope, guards)
        if name == "import_tensorrt" and self.b.family == "tensorrt":
            for arg in node.args:
                self.expr(arg, scope, guards)
            return T("module")
        if name == "cudart" and self.b.family == "cuda" and not node.args:
            return T("module")
        args = [self.expr(a, scope, guards) for a in node.args]
        kwargs = {k.arg: self.expr(k.value, scope, guards) for k in node.keywords}
        if name in UNWRAPPERS and self.b.family == "cuda" and args and args[0] is not None \
                and args[0].kind == "result":
            rest = args[0].items[1:]
            return rest[0] if len(rest) == 1 else T("tuple", (), rest) if rest else None
        callee = self.expr(func, scope, guards) if isinstance(func, ast.Attribute) else (
            self._lookup(scope, func.id) if isinstance(func, ast.Name) else None)
        if callee is not None and callee.kind in ("class", "method", "func"):
            return self._check_call(scope, node, callee, args, kwargs, guards)
        if isinstance(func, ast.Name):
            return self._local_call(func.id, node, scope, args, kwargs)
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self":
            info = self._self_class(scope)
            if info is not None and func.attr in info.methods:
                method = info.methods[func.attr]
                self._bind_params(method, args, kwargs, skip_self=True)
                return self.returns.get(id(method))
        if isinstance(func, ast.Attribute):  # module.function() of ours (cuda_rt.check, ...)
            return self._local_call(func.attr, node, scope, args, kwargs)
        return None

    def _local_call(self, name: str, node: ast.Call, scope: Scope, args: list, kwargs: dict) -> T | None:
        cls = self._local_class(scope, name)
        if cls is not None:
            return T("local", local=cls)
        chain: Scope | None = scope
        while chain is not None:  # a function nested in one of the enclosing functions
            if name in chain.funcs:
                func = chain.funcs[name]
                break
            chain = chain.parent
        else:
            defs = self.functions.get(name, [])
            if len(defs) != 1:
                return None
            func = defs[0][0]
        self._bind_params(func, args, kwargs, skip_self=False)
        return self.returns.get(id(func))

    def _local_class(self, scope: Scope | None, name: str) -> ClassInfo | None:
        while scope is not None:
            for info in self.classes.values():
                if info.name == name and info.scope is scope and info.bases:
                    return info
            scope = scope.parent
        return None

    def _bind_params(self, func: ast.FunctionDef, args: list, kwargs: dict, skip_self: bool) -> None:
        scope = self.scopes[id(func)]
        names = [a.arg for a in func.args.args][1 if skip_self else 0:]
        for pname, value in zip(names, args, strict=False):
            self._set_var(scope, pname, value)
        for pname, value in kwargs.items():
            if pname in names:
                self._set_var(scope, pname, value)

    def _getattr(self, node: ast.Call, scope: Scope, guards: tuple) -> T | None:
        owner = self.expr(node.args[0], scope, guards)
        names = self._names(node.args[1], scope)
        optional = len(node.args) > 2
        if len(node.args) > 2:
            self.expr(node.args[2], scope, guards)
        if owner is None or owner.kind not in ("module", "class", "inst"):
            return None
        if names is None:
            self._use(scope, node, _src(node), ".".join(owner.path), "dynamic", guards,
                      "getattr with a name this check cannot resolve (use a constant or a module-level dict)")
            return None
        typed = None
        for name in names:
            typed = self._check_member(scope, node, owner, name, guards, optional=optional) or typed
        return typed

    def _names(self, node: ast.expr, scope: Scope) -> list[str] | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
            return self.module_dicts.get((scope.module, node.value.id))
        if isinstance(node, ast.Name):
            func = scope.node
            for sub in ast.walk(func):
                if isinstance(sub, ast.Assign) and any(isinstance(t, ast.Name) and t.id == node.id
                                                       for t in sub.targets):
                    return self._names(sub.value, scope)
        return None

    # -- checks ---------------------------------------------------------------------
def _leaves(value: T | None) -> int:
    if value is None:
        return 0
    if value.kind in ("tuple", "result"):
        return sum(_leaves(item) for item in value.items)
    return 1


def _better(new: T | None, old: T | None) -> bool:
    """Keep the first type found for a name, unless a later one knows more of a tuple's items."""
    if new is None or new == old:
        return False
    return old is None or (old.kind in ("tuple", "result") and _leaves(new) > _leaves(old))


def _known(value: T | None) -> bool:
    """A type worth remembering for a name: not unknown, and not ``None`` (``self.x = None`` first)."""
    return value is not None and value != T("lit", ("None",))


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def mismatch_classification() -> dict[str, bool]:
    """``is_api_mismatch`` on real errors of this binding: a name it lacks, arguments it rejects."""
    from engines.tensorrt.runtime import is_api_mismatch

    trt = importlib.import_module("tensorrt_bindings")
    out = {}
    try:
        trt.BuilderFlag.NOT_A_FLAG_IN_ANY_VERSION  # noqa: B018
    except AttributeError as exc:
        out["missing enum member"] = is_api_mismatch(exc)
    try:
        trt.Builder("not a logger")
    except TypeError as exc:
        out["rejected constructor arguments"] = is_api_mismatch(exc)
    try:
        None.create_execution_context  # noqa: B018  (our bug: deserialize returned None)
    except AttributeError as exc:
        out["attribute of None (our bug)"] = is_api_mismatch(exc)
    try:
        len(3)
    except TypeError as exc:
        out["TypeError of ours"] = is_api_mismatch(exc)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=["tensorrt", "cuda"], required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--mismatch-check", action="store_true")
    parser.add_argument("sources", nargs="*", type=Path)
    args = parser.parse_args(argv)
    binding = Binding(args.family)
    root = args.root.resolve()
    files = [p.resolve() for p in args.sources] or sorted(
        p for d in ("engines", "scripts") for p in (root / d).rglob("*.py"))
    usages = Walker(binding, root, files).run()
    out: dict[str, Any] = {"family": args.family, "version": binding.version,
                           "usages": [u.__dict__ for u in sorted(usages, key=lambda u: (u.file, u.line))]}
    if args.mismatch_check:
        out["mismatch_classification"] = mismatch_classification()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
