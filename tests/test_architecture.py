"""The package layout: imports point one way, and there are no import loops.

cli -> line -> mender -> disk, pki; edge sits beside line and uses pki and
mender. run and errors are used by all and use nothing of imageprov.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import imageprov

PACKAGE = Path(imageprov.__file__).parent

# Which top-level parts of imageprov each part may import (itself always allowed).
ALLOWED: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    "run": frozenset({"errors"}),
    "locks": frozenset(),
    "disk": frozenset({"errors", "run", "locks"}),
    "pki": frozenset({"errors", "run", "locks"}),
    "mender": frozenset({"errors", "run", "disk", "pki"}),
    "line": frozenset({"errors", "run", "disk", "pki", "mender"}),
    "edge": frozenset({"errors", "run", "pki", "mender"}),
    "cli": frozenset({"errors", "run", "disk", "pki", "mender", "line", "edge"}),
    "__main__": frozenset({"cli"}),
    "__init__": frozenset(),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every imageprov module that ``path`` imports, at any depth of the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("imageprov"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("imageprov"):
            # `from imageprov.disk import gpt` imports the module imageprov.disk.gpt.
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                sub = PACKAGE.parent / Path(*candidate.split("."))
                is_module = sub.with_suffix(".py").exists() or (sub / "__init__.py").exists()
                found.add(candidate if is_module else node.module)
    return found


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}


def test_every_part_is_known() -> None:
    parts = {_part(module) for module in _graph()}
    assert parts <= ALLOWED.keys(), f"new top-level part(s) {parts - ALLOWED.keys()}: give them a place in ALLOWED"


def test_imports_point_one_way() -> None:
    wrong = []
    for module, imported in sorted(_graph().items()):
        here = _part(module)
        for target in sorted(imported):
            there = _part(target)
            if there != here and there not in ALLOWED[here] and target != "imageprov":
                wrong.append(f"{module} imports {target}")
            if target == "imageprov" and here != "cli":
                wrong.append(f"{module} imports the package root")
    assert not wrong, "imports against the layout:\n" + "\n".join(wrong)


def _loops(graph: dict[str, set[str]]) -> list[str]:
    """Pairs of modules that reach each other through imports."""

    def reaches(start: str, goal: str) -> bool:
        seen: set[str] = set()
        todo = list(graph.get(start, ()))
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo.extend(graph.get(current, ()))
        return False

    return [f"{a} <-> {b}" for a, b in itertools.combinations(sorted(graph), 2) if reaches(a, b) and reaches(b, a)]


def test_no_import_loops() -> None:
    loops = _loops(_graph())
    assert not loops, "import loops:\n" + "\n".join(loops)


def test_the_loop_finder_sees_a_loop() -> None:
    """Not vacuous: table <-> mbr as it was before the layout, also through a third module."""
    assert _loops({"t": {"m"}, "m": {"t"}}) == ["m <-> t"]
    assert _loops({"t": {"p"}, "p": {"m"}, "m": {"t"}})
    assert _loops({"t": set(), "p": {"m", "t"}, "m": {"t"}}) == []
