"""The code's shape, checked statically: module size, private imports, function-level imports.

The one-way flow and the absence of cycles are checked by `lint-imports` (pyproject.toml); these
checks cover what import-linter cannot see.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "finesteer"
MAX_LINES = 400
# Data catalogues may be longer than a code module (the brief allows it).
LONG_DATA_MODULES = frozenset({"data/catalog.py"})


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "vendored" not in p.parts)


def _name(path: Path) -> str:
    return path.relative_to(SRC).as_posix()


def _module_path(path: Path) -> str:
    parts = ["finesteer", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = _module_path(path).split(".")
    if not _is_package(path):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_no_module_over_400_lines(path: Path) -> None:
    if _name(path) in LONG_DATA_MODULES:
        return
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{_name(path)} has {lines} lines; split it by concept"


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_no_private_name_imported_from_another_module(path: Path) -> None:
    tree = ast.parse(path.read_text())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _resolve(path, node).startswith("finesteer"):
            bad += [
                f"{_resolve(path, node)}.{a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
    assert not bad, f"{_name(path)} imports private names: {bad}"


def _function_level_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            found += [n for n in ast.walk(fn) if isinstance(n, ast.Import | ast.ImportFrom)]
    return found


@pytest.mark.parametrize("path", [p for p in _modules() if _name(p).split("/")[0] != "cli"], ids=_name)
def test_no_function_level_import_of_finesteer(path: Path) -> None:
    """Function-level imports hide edges from readers; heavy third-party imports may stay lazy.

    `cli/` is exempt: it is the top stage (it cannot dodge a layer) and imports the library inside
    each command so that `finesteer --help` does not load torch.
    """
    tree = ast.parse(path.read_text())
    bad = []
    for node in _function_level_imports(tree):
        names = [_resolve(path, node)] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
        bad += [f"line {node.lineno}: {n}" for n in names if n.split(".")[0] == "finesteer"]
    assert not bad, f"{_name(path)} imports finesteer inside a function: {bad}"
