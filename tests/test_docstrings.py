"""Every module of store, pairgen, distill (distill/lpips included) and d2g has a docstring, as has
every public class, function and method; every public class's constructor arguments are named in
its class or __init__ docstring (a dataclass's fields are its constructor arguments)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("store", "pairgen", "distill", "d2g")

# Files whose docstrings are still being written elsewhere; an entry is refused once its file passes.

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def _is_dataclass(cls: ast.ClassDef) -> bool:
    for decorator in cls.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if getattr(target, "id", getattr(target, "attr", None)) == "dataclass":
            return True
    return False


def _constructor(cls: ast.ClassDef) -> tuple[ast.AST | None, list[str]]:
    """(__init__ or None, the constructor's argument names) of `cls`."""
    init = next((c for c in cls.body if isinstance(c, _FUNCTIONS) and c.name == "__init__"), None)
    if init is not None:
        a = init.args
        names = [x.arg for x in a.posonlyargs + a.args][1:] + [x.arg for x in a.kwonlyargs]
        return init, names + [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    if not _is_dataclass(cls):
        return None, []
    fields = []
    for stmt in cls.body:
        if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
            continue
        if stmt.target.id.startswith("_") or "ClassVar" in ast.unparse(stmt.annotation):
            continue
        if stmt.value is not None and "init=False" in ast.unparse(stmt.value):
            continue
        fields.append(stmt.target.id)
    return None, fields


def _named(name: str, text: str) -> bool:
    # A whole word, so that `net` is not "named" by "network".
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) is not None


def _problems(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text(), filename=str(path))
    found = [] if ast.get_docstring(tree) else [f"{rel}: module docstring"]

    def visit(node: ast.AST, prefix: str, public_scope: bool) -> None:
        # Public methods of private classes count too: they are called from outside the class.
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (*_FUNCTIONS, ast.ClassDef)):
                continue
            public = public_scope and not child.name.startswith("_")
            where = f"{rel}:{child.lineno} {prefix}{child.name}"
            if public and not ast.get_docstring(child):
                found.append(f"{where}: docstring")
            if isinstance(child, ast.ClassDef):
                if public:
                    init, names = _constructor(child)
                    text = (ast.get_docstring(child) or "") + "\n" + ((init and ast.get_docstring(init)) or "")
                    missing = [n for n in names if not _named(n, text)]
                    if missing:
                        found.append(f"{where}: constructor arguments not in its docstring {missing}")
                visit(child, f"{prefix}{child.name}.", public_scope=True)

    visit(tree, "", public_scope=True)
    return found


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_public_names_are_documented(package):
    files = _files(package)
    assert len(files) > 5, f"{package}: found only {files}"
    problems = [p for path in files for p in _problems(path)]
    assert not problems, "undocumented:\n" + "\n".join(problems)
