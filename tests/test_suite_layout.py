"""The test suite's own layout: test modules share helpers through the ``tests/_*.py`` modules, never by
importing one another (a test module imported elsewhere runs its module-level setup twice and couples the files)."""

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_test_module_imports_another() -> None:
    offenders = {
        path.name: sorted(m for m in _imported_modules(path) if m.split(".")[-1].startswith("test_"))
        for path in sorted(TESTS.glob("test_*.py"))
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}
