"""The distribution installs, its packages import, its CLIs explain themselves, and the layout's
dependency rules hold: who may import whom, and no import cycles (function-level imports included)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("store", "d2g", "pairgen", "distill")

# Who may import whom, by module prefix; the longest matching prefix rules. `store` is the base and
# imports nothing of ours; `d2g` holds what pairgen and distill share and sits below both, except its
# demo, which drives all three from the top; pairgen and distill never import each other.
ALLOWED = {
    "store": set(),
    "d2g": {"store"},
    "pairgen": {"store", "d2g"},
    "distill": {"store", "d2g"},
    "d2g.demo": {"store", "d2g", "pairgen", "distill"},
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(path: Path, module: str, known: set[str]) -> set[str]:
    """First-party modules `path` imports anywhere in its body (`from pkg import mod` counts as mod)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def rule_for(module: str, table: dict[str, set[str]]) -> tuple[str, set[str]]:
    matches = [p for p in table if module == p or module.startswith(p + ".")]
    prefix = max(matches, key=len)
    return prefix, table[prefix]


def layout_violations(graph: dict[str, set[str]], table: dict[str, set[str]]) -> list[str]:
    """Every import that the table forbids, as 'importer -> imported'."""
    problems = []
    for module, targets in sorted(graph.items()):
        prefix, allowed = rule_for(module, table)
        for target in sorted(targets):
            target_prefix, _ = rule_for(target, table)
            own = target_prefix == prefix or (target.split(".")[0] == module.split(".")[0]
                                              and not target.startswith("d2g.demo"))
            if not own and target.split(".")[0] not in allowed:
                problems.append(f"{module} -> {target}")
            elif target.startswith("d2g.demo") and not module.startswith("d2g.demo"):
                problems.append(f"{module} -> {target}")
    return problems


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                group.append(item)
                if item == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def project_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    known = set(files)
    graph = {}
    for module, path in files.items():
        # A package's parent __init__ runs before any submodule; an edge to it is not a dependency choice.
        targets = imported_modules(path, module, known) - {module}
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    return graph


def test_layout_rules_hold():
    problems = layout_violations(project_graph(), ALLOWED)
    assert not problems, "imports the layout forbids:\n" + "\n".join(problems)


def test_no_import_cycles():
    cycles = import_cycles(project_graph())
    assert not cycles, f"import cycles: {cycles}"


def test_checker_catches_violations_and_cycles():
    """The rules above can fail: a forbidden edge and a cycle are reported, allowed edges are not."""
    graph = {
        "pairgen.runner": {"store.pairstore", "d2g.teacher.loading", "distill.export"},
        "distill.trainer": {"store", "d2g.cli.options"},
        "d2g.teacher.loading": {"store.url", "pairgen.config"},
        "d2g.cli.options": {"d2g.demo"},
        "d2g.demo": {"pairgen.runner", "distill.trainer"},
        "store.writer": {"store.pairstore"},
        "store.pairstore": {"store.writer"},
    }
    assert layout_violations(graph, ALLOWED) == [
        "d2g.cli.options -> d2g.demo",
        "d2g.teacher.loading -> pairgen.config",
        "pairgen.runner -> distill.export",
    ]
    assert sorted(import_cycles(graph)) == [["d2g.cli.options", "d2g.demo", "distill.trainer"],
                                            ["store.pairstore", "store.writer"]]


def test_no_generic_top_level_names():
    """Only our four import names are installed; generic ones (common, utils, shapes...) clash."""
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert sorted(name.rstrip("*") for name in include["include"]) == sorted(PACKAGES)


def test_packages_import():
    out = subprocess.run([sys.executable, "-c", "import store, pairgen, distill, d2g.demo; print('ok')"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("command", ["store", "pairgen", "distill"])
def test_console_script_help(command):
    exe = Path(sys.executable).parent / command
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout.lower() and len(out.stdout.splitlines()) > 3
