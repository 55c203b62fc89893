"""The package's import graph: no circle among its modules (what the module level imports), and a
spec base that imports nothing of the package, so any component can build on it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" or \
        isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"


def module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: modules of the package it imports at module level}`` (function bodies and
    ``if TYPE_CHECKING:`` blocks excluded); importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``."""
    files = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (root / package).rglob("*.py")}

    def targets(name: str) -> set[str]:
        out = set()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            if ".".join(parts[:i]) in files:
                out.add(".".join(parts[:i]))
        return out

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps: set[str] = set()
        is_pkg = path.name == "__init__.py"
        body = list(ast.parse(path.read_text(encoding="utf-8")).body)
        while body:
            node = body.pop(0)
            if isinstance(node, ast.If) and not _is_type_checking(node):
                body += node.body + node.orelse
            elif isinstance(node, ast.Try):
                body += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    deps |= targets(a.name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                deps |= targets(base)
                for a in node.names:
                    deps |= {f"{base}.{a.name}"} & set(files)
        graph[mod] = deps - {mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_walk_finds_a_planted_circle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import c\n")
    (pkg / "sub" / "c.py").write_text("def f():\n    import pkg.b\nfrom .. import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\nimport pkg.a as x\n")
    graph = module_graph(tmp_path, "pkg")
    assert graph["pkg.sub.c"] == {"pkg", "pkg.b"} and graph["pkg.b"] == {"pkg", "pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.c", "pkg.b", "pkg.a"]
    (pkg / "b.py").write_text("def g():\n    import pkg.a\n")  # inside a function: not a circle
    assert find_cycle(module_graph(tmp_path, "pkg")) is None


def test_the_package_has_no_import_circle():
    graph = module_graph(ROOT, "visgen")
    assert "visgen.config" in graph["visgen.stages"] and "visgen.base" in graph["visgen.data.ingest"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # The base of every section and the workdir import nothing of the package but storage.
    assert graph["visgen.base"] <= {"visgen"} and graph["visgen.workdir"] <= {"visgen", "visgen.storage"}


def test_the_spec_base_imports_only_pydantic_and_yaml():
    code = ("import sys; import visgen.base; "
            "bad = sorted(m for m in sys.modules if m.startswith('visgen.') and m != 'visgen.base' "
            "or m.split('.')[0] in ('torch', 'ray', 'mlflow', 'pyarrow', 'numpy', 'tokenizers')); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
