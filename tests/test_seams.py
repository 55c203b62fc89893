"""Layers meet at public names: no visgen module uses a ``_private`` name of another.

An AST walk over ``visgen/`` (module- and function-level imports alike) finds
``from visgen.x import _y``, ``from . import _y`` and ``x._y`` where ``x`` is another visgen
module. That Serve uses only the public side of ``Model`` is checked at run time by
``tests/test_serve_units.py::test_the_replica_uses_only_the_public_model``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Reach-ins that other changes remove; this list only shrinks. (file, "module.name")
KNOWN: set[tuple[str, str]] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private_reach_ins(root: Path, package: str) -> list[tuple[str, int, str]]:
    """``(file, line, "module.name")`` for each use of another module's private name in ``root/package``."""
    files = sorted((root / package).rglob("*.py"))
    modules = {_module_name(p, root) for p in files}
    found: list[tuple[str, int, str]] = []
    for path in files:
        here = _module_name(path, root)
        is_package = path.name == "__init__.py"
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        bound: dict[str, str] = {}  # local name -> the package module it names
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == package:
                        if alias.asname:
                            bound[alias.asname] = alias.name
                        else:
                            bound[package] = package
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the package holding this module
                    base = here.split(".") if is_package else here.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != package:
                    continue
                for alias in node.names:
                    if _private(alias.name) and source != here:
                        found.append((rel, node.lineno, f"{source}.{alias.name}"))
                    elif f"{source}.{alias.name}" in modules:
                        bound[alias.asname or alias.name] = f"{source}.{alias.name}"
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Attribute) and _private(node.attr)):
                continue
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if not isinstance(value, ast.Name) or value.id not in bound:
                continue
            target = ".".join([bound[value.id], *reversed(chain)])
            if target in modules and target != here:
                found.append((rel, node.lineno, f"{target}.{node.attr}"))
    return sorted(set(found))


def test_the_walk_catches_planted_reach_ins(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '1'\n")
    (pkg / "a.py").write_text("def _secret(): ...\ndef public(): ...\nfrom pkg.a import _secret as again\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("_hidden = 1\n")
    (pkg / "b.py").write_text(
        "import pkg.a as amod\n"
        "import pkg.sub.c\n"
        "from pkg import a\n"
        "from pkg.a import _secret\n"                   # 4: private name imported
        "from pkg.a import public as _fine\n"           # a public name under a private alias: fine
        "from pkg import __version__\n"                 # dunders are public
        "def f():\n"
        "    from .a import _secret as s\n"             # 8: relative, inside a function
        "    return amod._secret() + a._secret()\n"     # 9: through module aliases (twice)
        "x = pkg.sub.c._hidden\n"                       # 10: through the dotted module path
        "y = a.public()\n")
    (pkg / "sub" / "d.py").write_text("from . import c\nz = c._hidden\nfrom .. import a\n")  # 2: relative sibling
    found = private_reach_ins(tmp_path, "pkg")
    assert found == [("pkg/b.py", 4, "pkg.a._secret"), ("pkg/b.py", 8, "pkg.a._secret"),
                     ("pkg/b.py", 9, "pkg.a._secret"), ("pkg/b.py", 10, "pkg.sub.c._hidden"),
                     ("pkg/sub/d.py", 2, "pkg.sub.c._hidden")], found


def test_no_visgen_module_uses_another_modules_private_names():
    found = private_reach_ins(ROOT, "visgen")
    new = [f"{file}:{line} uses {name}" for file, line, name in found if (file, name) not in KNOWN]
    assert not new, ("private names used across modules (make what is shared public where it belongs):\n"
                     + "\n".join(new))
