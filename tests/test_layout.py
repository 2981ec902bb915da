"""The package's shape, checked like lint: imports point only down the layers that
``bundleflow/__init__.py`` lists, and no module, function or constructor outgrows its budget.

Budgets (issue 26): a module ≤ 600 lines; a function ≤ 60 lines from ``def`` to its last line,
its docstring not counted; a constructor ≤ 8 parameters besides ``self``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bundleflow"

# bottom to top; a module may import its own layer and any layer before it
LAYERS: list[tuple[str, ...]] = [
    ("errors", "paths", "atomic", "__init__"),
    ("system", "valuations"),
    ("maths",),
    ("evaluation",),
    ("train",),
    ("perf",),
    ("cli", "__main__"),
]
MODULE_LINES, FUNCTION_LINES, CONSTRUCTOR_PARAMETERS = 600, 60, 8


def _layer(module: str) -> int:
    """``bundleflow.maths.flow`` -> the index of the layer that holds ``maths``."""
    parts = module.split(".")
    head = parts[1] if len(parts) > 1 else "__init__"
    for index, names in enumerate(LAYERS):
        if head in names:
            return index
    raise AssertionError(f"{module}: in no layer of tests/test_layout.py's LAYERS")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path) -> set[str]:
    """Every bundleflow module ``path`` imports, at any depth of the file (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("bundleflow"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("bundleflow"))
    return found


def test_every_import_points_down_the_layers():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        for target in _imports(path):
            if target not in modules:  # a name imported from a module, not a module
                continue
            if _layer(target) > _layer(name):
                upward.append(f"{name} imports {target}")
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_no_relative_imports_hide_a_dependency():
    relative = [
        str(path)
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level
    ]
    assert not relative


def test_every_folder_says_what_lives_there_and_what_it_may_import():
    for folder in sorted(p for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"{folder}/__init__.py: no docstring on imports"


def _function_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
    if docstring and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def budget_violations() -> list[str]:
    out = []
    for name, path in _modules().items():
        text = path.read_text()
        if (n := len(text.splitlines())) > MODULE_LINES:
            out.append(f"{name}: {n} lines (budget {MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if (n := _function_lines(node)) > FUNCTION_LINES:
                out.append(f"{name}.{node.name}: {n} lines (budget {FUNCTION_LINES})")
            if node.name == "__init__":
                a = node.args
                n = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) - 1
                if n > CONSTRUCTOR_PARAMETERS:
                    out.append(f"{name}.__init__: {n} parameters (budget {CONSTRUCTOR_PARAMETERS})")
    return sorted(out)


def test_modules_functions_and_constructors_stay_within_budget():
    violations = budget_violations()
    assert not violations, "over budget (split it):\n" + "\n".join(violations)


@pytest.mark.parametrize(
    "source, expected",
    [
        ("def f():\n" + "    x = 1\n" * 59, []),
        ("def f():\n" + "    x = 1\n" * 60, ["f: 61 lines"]),
        ('def f():\n    """doc\n\n    more"""\n' + "    x = 1\n" * 59, []),
        ("class A:\n    def __init__(self, a, b, c, d, e, f, g, h): pass\n", []),
        ("class A:\n    def __init__(self, a, b, c, d, e, f, g, h, *, i): pass\n", ["9 param"]),
    ],
)
def test_the_budget_check_itself(tmp_path, monkeypatch, source, expected):
    """The check counts what it says it counts (a check that cannot fail is no check)."""
    package = tmp_path / "bundleflow"
    package.mkdir()
    (package / "__init__.py").write_text(source)
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", package)
    found = budget_violations()
    assert len(found) == len(expected)
    for line, part in zip(found, expected, strict=True):
        assert part in line
