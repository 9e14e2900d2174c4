"""No SQL outside ``runner/store/``: the rest of the package talks to the store's protocols, so a
second backend needs no change anywhere else."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

RUNNER = Path(__file__).resolve().parent.parent / "runner"
STORE = RUNNER / "store"
SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|PRAGMA|BEGIN|COMMIT|ROLLBACK)\b")


def docstrings(tree: ast.Module) -> set[int]:
    """The ids of the docstring nodes of ``tree``: prose about SQL is not SQL."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def sql_and_sqlite3(path: Path) -> Iterator[str]:
    """Where ``path`` holds SQL in a string literal, or imports sqlite3."""
    tree = ast.parse(path.read_text(), filename=str(path))
    prose = docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            if match := SQL.search(node.value):
                yield f"line {node.lineno}: SQL ({match.group()}) in {node.value[:60]!r}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sqlite3":
                    yield f"line {node.lineno}: import sqlite3"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlite3":
            yield f"line {node.lineno}: from sqlite3 import"


def test_no_sql_and_no_sqlite3_outside_the_store() -> None:
    found = {}
    for path in sorted(RUNNER.rglob("*.py")):
        name = path.relative_to(RUNNER).as_posix()
        if path.is_relative_to(STORE):
            continue
        if problems := list(sql_and_sqlite3(path)):
            found[name] = problems
    assert not found, found


def test_the_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    source = tmp_path / "module.py"
    source.write_text(
        '"""Reads with SELECT, in prose: allowed."""\n'
        "import sqlite3\n"
        "from sqlite3 import Row\n"
        'QUERY = f"SELECT {1} FROM jobs"\n'
        'TEXT = "Selected, begun, committed: plain words"\n'
    )
    assert [p.split(":")[0] for p in sql_and_sqlite3(source)] == ["line 2", "line 3", "line 4"]
