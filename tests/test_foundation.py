"""The distribution installs, its packages import, its CLIs explain themselves, and the
dependency direction between packages holds."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Who may import whom: store is the base; pairgen may use store; distill may use both.
ALLOWED = {"store": set(), "pairgen": {"store"}, "distill": {"store", "pairgen"}}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_dependency_direction(package):
    forbidden = set(ALLOWED) - ALLOWED[package] - {package}
    offenders = {
        str(p.relative_to(ROOT)): sorted(_imported_packages(p) & forbidden)
        for p in (ROOT / package).rglob("*.py")
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"{package} imports packages it must not: {offenders}"


def test_packages_import():
    out = subprocess.run([sys.executable, "-c", "import store, pairgen, distill; print('ok')"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("command", ["store", "pairgen", "distill"])
def test_console_script_help(command):
    exe = Path(sys.executable).parent / command
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout.lower() and len(out.stdout.splitlines()) > 3
