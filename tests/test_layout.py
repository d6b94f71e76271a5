"""The test suite's own layout rules (issue 33): tests import nothing from benchmarks/ (what both need
lives in the package or in a conftest), and shared helpers are imported from a conftest, never from
another test module."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imported_modules(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


def test_no_test_imports_benchmarks_or_another_test_module():
    bad = {}
    for path in sorted(TESTS.rglob("*.py")):
        mods = imported_modules(path)
        wrong = sorted(m for m in mods if m == "benchmarks" or m.startswith("benchmarks.")
                       or (m.startswith("tests.") and m.rsplit(".", 1)[-1].startswith("test_")))
        if wrong:
            bad[str(path.relative_to(TESTS))] = wrong
    assert not bad, f"move what these share into the package or a conftest: {bad}"
