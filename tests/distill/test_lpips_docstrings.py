"""Every public class and function of distill/lpips has a docstring naming its constructor's arguments."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "distill" / "lpips"


def _problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = [] if ast.get_docstring(tree) else [f"{path.name}: module docstring"]

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.ClassDef)) or child.name.startswith("_"):
                continue
            where = f"{path.name}:{child.lineno} {prefix}{child.name}"
            doc = ast.get_docstring(child) or ""
            if not doc:
                found.append(where)
            if isinstance(child, ast.ClassDef):
                init = next(
                    (c for c in child.body if isinstance(c, ast.FunctionDef) and c.name == "__init__"), None
                )
                if init is not None:
                    doc += ast.get_docstring(init) or ""
                    args = [a.arg for a in init.args.args[1:] + init.args.kwonlyargs]
                else:  # dataclass fields are its constructor's arguments
                    args = [f.target.id for f in child.body if isinstance(f, ast.AnnAssign)]
                missing = [a for a in args if a not in doc]
                if missing:
                    found.append(f"{where} constructor arguments {missing}")
                visit(child, f"{child.name}.")

    visit(tree, "")
    return found


def test_public_names_of_distill_lpips_are_documented():
    problems = [p for path in sorted(ROOT.glob("*.py")) for p in _problems(path)]
    assert not problems, "\n".join(problems)
