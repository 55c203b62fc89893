"""The package's import graph: no circle among its modules, neither in what the module level imports
nor once the imports inside functions are added; every import inside a function says on its line
why it is there; a spec base that imports nothing of the package, so any component can build on it;
``import visgen`` stays cheap and ``visgen.Pipeline`` is a deprecated alias of ``visgen.Model``."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING" or \
        isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"


def _is_lazy_reexport(node: ast.AST, path: Path) -> bool:
    """A package's module-level ``__getattr__`` (PEP 562): it loads the package's own submodules on
    attribute access, after the package has run, so its imports are no edge of a circle."""
    return path.name == "__init__.py" and isinstance(node, ast.FunctionDef) and node.name == "__getattr__"


def _package_files(root: Path, package: str) -> dict[str, Path]:
    return {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
            for p in (root / package).rglob("*.py")}


def function_imports(tree: ast.Module, skip=lambda node: False) -> list[ast.Import | ast.ImportFrom]:
    """The import statements inside functions (``if TYPE_CHECKING:`` blocks and ``skip`` nodes excluded)."""
    out: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child) or skip(child):
                continue
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                out.append(child)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return out


def module_graph(root: Path, package: str, functions: bool = False) -> dict[str, set[str]]:
    """``{module: modules of the package it imports at module level}`` (function bodies and
    ``if TYPE_CHECKING:`` blocks excluded); importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``.
    ``functions``: add what the functions import (a package's lazy ``__getattr__`` re-exports excepted)."""
    files = _package_files(root, package)

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
        tree = ast.parse(path.read_text(encoding="utf-8"))
        body = list(tree.body)
        if functions:
            body += function_imports(tree, skip=lambda node: _is_lazy_reexport(node, path))
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


def _is_reason(comment: str) -> bool:
    text = comment.lstrip("#").strip()
    return len(text.split()) > 1 and not text.startswith(("noqa", "type:", "pragma"))


def imports_without_reason(root: Path, package: str) -> list[str]:
    """``path:line: statement`` of each import inside a function with no comment on its lines, on a
    comment line just above, or in the block of such imports it follows (blank lines between allowed)."""
    missing = []
    for path in sorted((root / package).rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        comments = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(text).readline)
                    if tok.type == tokenize.COMMENT and _is_reason(tok.string)}
        said = set()  # last lines of the imports whose reason is given
        for node in sorted(function_imports(ast.parse(text)), key=lambda n: n.lineno):
            above = node.lineno - 1
            while above > 0 and not lines[above - 1].strip():
                above -= 1
            if comments & set(range(node.lineno, node.end_lineno + 1)) or above in said or \
                    above in comments and lines[above - 1].lstrip().startswith("#"):
                said.add(node.end_lineno)
            else:
                missing.append(f"{path.relative_to(root)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return missing


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
    # ... until the imports inside functions count, which a package's lazy __getattr__'s do not
    assert find_cycle(module_graph(tmp_path, "pkg", functions=True)) == ["pkg.a", "pkg.sub.c", "pkg.b", "pkg.a"]
    (pkg / "__init__.py").write_text("def __getattr__(name):\n    from pkg import a\n    return a\n")
    (pkg / "b.py").write_text("")
    assert find_cycle(module_graph(tmp_path, "pkg", functions=True)) is None
    assert imports_without_reason(tmp_path, "pkg") == ["pkg/__init__.py:2: from pkg import a",
                                                       "pkg/sub/c.py:2: import pkg.b"]


def test_the_reason_check_reads_comments_on_the_line_above_and_through_a_block(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        "def f():\n"
        "    import json  # a reason\n"
        "    import os\n"                            # follows a block with a reason
        "\n"
        "    # torch: a reason above\n"
        "    from pkg import (\n"
        "        a,\n"
        "    )\n"
        "    x = 1  # not an import\n"
        "    import sys\n"
        "    import re  # noqa\n")
    assert imports_without_reason(tmp_path, "pkg") == ["pkg/m.py:10: import sys", "pkg/m.py:11: import re  # noqa"]


def test_the_package_has_no_import_circle():
    graph = module_graph(ROOT, "visgen")
    assert "visgen.config" in graph["visgen.stages"] and "visgen.base" in graph["visgen.data.ingest"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # The base of every section and the workdir import nothing of the package but storage.
    assert graph["visgen.base"] <= {"visgen"} and graph["visgen.workdir"] <= {"visgen", "visgen.storage"}


def test_no_circle_once_the_imports_inside_functions_count():
    graph = module_graph(ROOT, "visgen", functions=True)
    assert "visgen.inference" in graph["visgen.cli"]  # a lazy one: loading a bundle imports torch
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_every_import_inside_a_function_says_why_it_is_not_at_the_top():
    missing = imports_without_reason(ROOT, "visgen")
    assert not missing, ("imports inside functions with no reason (a comment on the line or just above): move "
                         "them to the top of the module, or say why they stay lazy\n" + "\n".join(missing))


def test_import_visgen_is_cheap_and_pipeline_is_a_deprecated_alias_of_model():
    code = ("import sys, visgen; bad = sorted(m for m in ('torch', 'ray', 'mlflow', 'pyarrow', 'visgen.inference') "
            "if m in sys.modules); print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    import visgen
    from visgen.inference import Model

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert visgen.Model is Model
    with pytest.warns(DeprecationWarning, match=r"visgen\.Pipeline is deprecated: use visgen\.Model"):
        assert visgen.Pipeline is Model
    with pytest.raises(AttributeError, match="no attribute 'pipeline_spec'"):
        visgen.pipeline_spec


def test_the_spec_base_imports_only_pydantic_and_yaml():
    code = ("import sys; import visgen.base; "
            "bad = sorted(m for m in sys.modules if m.startswith('visgen.') and m != 'visgen.base' "
            "or m.split('.')[0] in ('torch', 'ray', 'mlflow', 'pyarrow', 'numpy', 'tokenizers')); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
