"""The checks of the conformance walk: every use of a binding object is recorded here, with why it fails.

``Checks`` is mixed into ``api_conformance.Walker``: the walker infers types, and calls these
to check a member read, a call (``api_bindings._fits`` on each overload), a property write,
an override, and to record each as a ``Usage`` (in the final pass only).
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from typing import Any

from api_bindings import Binding, T, _fits, _is_member, _subclass


@dataclass
class Usage:
    file: str
    line: int
    expr: str
    target: str
    kind: str  # attr | call | set | subclass | override | dynamic
    guarded: bool
    ok: bool
    problem: str | None = None


class Checks:
    """Needs ``self.b`` (the Binding), ``self.final`` and ``self.usages`` from the walker; ``scope``
    arguments are its ``api_conformance.Scope`` (its module name is where a use is recorded)."""

    b: Binding
    final: bool
    usages: dict

    def _member(self, owner: T, name: str) -> tuple[bool, T | None, Any]:
        """Does ``owner`` have ``name`` in this binding, and what type is it?"""
        if owner.kind in ("module", "class"):
            base = self.b.resolve(owner.path)
            if not hasattr(base, name):
                return False, None, None
            obj = getattr(base, name)
            if owner.kind == "class" and callable(obj) and not isinstance(obj, type) and not _is_member(obj):
                return True, T("method", (*owner.path, name), ("unbound",)), obj
            return True, self.b.type_of_object(obj, (*owner.path, name)), obj
        cls = self.b.resolve(owner.path)
        if not hasattr(cls, name):
            return False, None, None
        raw = inspect.getattr_static(cls, name, None)
        if isinstance(raw, property):
            return True, self.b.property_return(raw), raw
        obj = getattr(cls, name)
        if callable(obj) and not isinstance(obj, type):
            return True, T("method", (*owner.path, name)), obj
        return True, self.b.type_of_object(obj, (*owner.path, name)), obj

    def _check_member(self, scope: Any, node: ast.AST, owner: T, name: str, guards: tuple,
                      optional: bool = False) -> T | None:
        exists, typed, _ = self._member(owner, name)
        guarded = optional or self._guarded(node, guards)
        target = ".".join((*owner.path, name)) or name
        self._use(scope, node, _src(node), target, "attr", guards, None if exists else
                  f"{self._owner_text(owner)} has no attribute {name!r}", guarded=guarded)
        return typed

    def _owner_text(self, owner: T) -> str:
        label = {"module": "module", "class": "class", "inst": "instance of"}.get(owner.kind, owner.kind)
        return f"{label} {'.'.join(owner.path) or self.b.module.__name__} ({self.b.version})"

    def _guarded(self, node: ast.AST, guards: tuple) -> bool:
        receiver = node.value if isinstance(node, ast.Attribute) else None
        return receiver is not None and ast.dump(receiver) in guards

    def _check_call(self, scope: Any, node: ast.Call, callee: T, args: list, kwargs: dict,
                    guards: tuple) -> T | None:
        obj = self.b.resolve(callee.path)
        name = callee.path[-1] if callee.path else "?"
        target = ".".join(callee.path)
        star = any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords)
        if callee.kind == "class":
            sigs = self.b.signatures(getattr(obj, "__init__", None), "__init__")
            if sigs is None or not any(p for s in sigs for p in s["params"]):
                sigs = self.b.signatures(obj, name)
            drop_self, result = True, T("inst", callee.path)
        else:
            sigs = self.b.signatures(obj, name)
            # a method read off an instance is bound; read off a class, self is passed explicitly
            drop_self = callee.kind == "method" and callee.items != ("unbound",)
            result = None
        if sigs is None:
            self._use(scope, node, _src(node), target, "call", guards, None)
            return result
        problems = []
        for sig in sigs:
            params = sig["params"]
            if drop_self and params and params[0][0] in ("self", "arg0"):
                params = params[1:]
            problem = None if star else _fits(params, args, kwargs, self.b)
            if problem is None:
                if result is None:
                    result = self.b.returns(sig["returns"])
                self._use(scope, node, _src(node), target, "call", guards, None)
                return result
            problems.append(problem)
        self._use(scope, node, _src(node), target, "call", guards,
                  f"no signature of {target} in {self.b.version} accepts this call: " + "; ".join(problems))
        return result

    def _check_set(self, scope: Any, target: ast.Attribute, owner: T, value: T | None,
                   guards: tuple) -> None:
        cls = self.b.resolve(owner.path)
        raw = inspect.getattr_static(cls, target.attr, None)
        where = ".".join((*owner.path, target.attr))
        if raw is None:
            problem = f"{self._owner_text(owner)} has no attribute {target.attr!r} to set"
        elif not isinstance(raw, property) or raw.fset is None:
            problem = f"{where} is read-only in {self.b.version}"
        else:
            problem = None
            current = self.b.property_return(raw)
            if value is not None and current is not None and current.kind == "inst" and value.kind == "inst" \
                    and not _subclass(self.b, value.path, current.path):
                problem = f"{where} takes {'.'.join(current.path)}, given {'.'.join(value.path)}"
        self._use(scope, target, _src(target) + " = ...", where, "set", guards, problem,
                  guarded=self._guarded(target, guards))

    def _check_override(self, scope: Any, method: ast.FunctionDef, base: T, name: str,
                        guards: tuple) -> None:
        cls = self.b.resolve(base.path)
        target = ".".join((*base.path, name))
        if not hasattr(cls, name):
            self._use(scope, method, f"def {name}", target, "override", guards,
                      f"{target} does not exist in {self.b.version}: the override is never called")
            return
        sigs = self.b.signatures(getattr(cls, name), name) or []
        ours = len(method.args.args)
        if sigs and not any(len(s["params"]) == ours for s in sigs):
            self._use(scope, method, f"def {name}", target, "override", guards,
                      f"{target} takes {[len(s['params']) for s in sigs]} parameters in {self.b.version}, "
                      f"ours {ours}")
            return
        self._use(scope, method, f"def {name}", target, "override", guards, None)

    def _use(self, scope: Any, node: ast.AST, expr: str, target: str, kind: str, guards: tuple,
             problem: str | None, guarded: bool | None = None) -> None:
        if not self.final:
            return
        key = (scope.module, getattr(node, "lineno", 0), getattr(node, "col_offset", 0), kind + expr + target)
        self.usages[key] = Usage(scope.module, getattr(node, "lineno", 0), expr, target, kind,
                                 bool(guarded), problem is None, problem)


def _src(node: ast.AST) -> str:
    text = ast.unparse(node)
    return text if len(text) <= 120 else text[:117] + "..."
