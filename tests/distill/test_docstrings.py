"""Every public class, function and method of distill (outside distill/lpips) has a docstring, and
every constructor's arguments are named in its class or __init__ docstring."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "distill"


def _undocumented(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    problems = [] if ast.get_docstring(tree) else [f"{path.name}: module"]

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            public = not child.name.startswith("_")
            where = f"{path.name}:{child.lineno} {prefix}{child.name}"
            if isinstance(child, ast.ClassDef):
                if public and not ast.get_docstring(child):
                    problems.append(where)
                init = next((c for c in child.body if isinstance(c, ast.FunctionDef) and c.name == "__init__"), None)
                if public and init is not None:
                    text = (ast.get_docstring(child) or "") + (ast.get_docstring(init) or "")
                    missing = [a.arg for a in init.args.args[1:] + init.args.kwonlyargs if a.arg not in text]
                    if missing:
                        problems.append(f"{where}.__init__ arguments {missing}")
                visit(child, f"{prefix}{child.name}.")
            elif public and not ast.get_docstring(child):
                problems.append(where)

    visit(tree, "")
    return problems


def test_public_names_have_docstrings():
    paths = [p for p in sorted(ROOT.rglob("*.py")) if "lpips" not in p.relative_to(ROOT).parts]
    assert len(paths) > 10
    problems = [problem for path in paths for problem in _undocumented(path)]
    assert not problems, "undocumented:\n" + "\n".join(problems)
