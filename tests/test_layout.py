"""The package's layering, read from the source with ``ast``: no module reaches into another's
private names, and the bottom of the tree (``errors``, ``provider``) imports nothing above it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import runner

PACKAGE = Path(runner.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def imported_from(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` reads from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, *([node.module] if node.module else [])])


def is_runner_module(name: str) -> bool:
    parts = name.split(".")
    if parts[0] != "runner":
        return False
    path = PACKAGE.joinpath(*parts[1:])
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def private_reaches(source: str, module: str, is_package: bool = False) -> list[str]:
    """Where ``source`` (the code of ``module``) uses a private name of another runner module:
    ``from runner.x import _name``, or ``_name`` read off a runner module it imported."""
    found: list[str] = []
    modules: dict[str, str] = {}  # local name -> the runner module it stands for
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            origin = imported_from(node, module, is_package)
            if not is_runner_module(origin) or origin == module:
                continue
            for alias in node.names:
                if is_private(alias.name):
                    found.append(f"line {node.lineno}: from {origin} import {alias.name}")
                elif is_runner_module(f"{origin}.{alias.name}"):
                    modules[alias.asname or alias.name] = f"{origin}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if is_runner_module(alias.name):
                    local = alias.asname or alias.name.split(".")[0]
                    modules[local] = alias.name if alias.asname else local
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not is_private(node.attr):
            continue
        chain, base = [], node.value
        while isinstance(base, ast.Attribute):
            chain.append(base.attr)
            base = base.value
        if isinstance(base, ast.Name) and base.id in modules:
            owner = ".".join([modules[base.id], *reversed(chain)])
            if is_runner_module(owner) and owner != module:
                found.append(f"line {node.lineno}: {owner}.{node.attr}")
    return found


def runner_sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_module_reaches_into_another_modules_private_names() -> None:
    reaches = []
    for path in runner_sources():
        module = module_name(path)
        for reach in private_reaches(path.read_text(), module, path.name == "__init__.py"):
            reaches.append(f"{path.relative_to(PACKAGE.parent)} {reach}")
    assert reaches == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from runner.emulator.errors import _ApiError", ["from runner.emulator.errors"]),
        ("from .errors import _ApiError as E", ["from runner.emulator.errors"]),
        (
            "from runner.emulator import errors\nerrors._INVALID",
            ["runner.emulator.errors._INVALID"],
        ),
        ("import runner.emulator.errors\nrunner.emulator.errors._x()", ["errors._x"]),
        ("import runner.emulator.errors as e\ne._x", ["runner.emulator.errors._x"]),
        ("from runner import __version__", []),
        ("from runner.emulator.errors import ErrorReply\nErrorReply._private", []),
        ("from runner.emulator import bucket\nbucket.TokenBucket(1, 1)._clock", []),
        ("self._seq = 1\nfrom runner.provider import SIZES", []),
    ],
)
def test_the_reach_check_sees_every_form(source: str, expected: list[str]) -> None:
    """The check above is only as good as what it sees: a reach in each form is found (in a
    module of the emulator, importing from a sibling), and public or own names are not."""
    found = private_reaches(source, "runner.emulator.server")
    assert len(found) == len(expected)
    for reach, part in zip(found, expected, strict=True):
        assert part in reach


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, ``TYPE_CHECKING`` blocks included."""
    module = module_name(path)
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(imported_from(node, module, is_package=False))
    return names


def is_stdlib(name: str) -> bool:
    return name.split(".")[0] in sys.stdlib_module_names


def test_errors_depends_on_nothing_above_it() -> None:
    """Every layer raises these errors, so they may build on the provider's facts and the
    standard library alone, or an import cycle waits for the next change."""
    imports = imports_of(PACKAGE / "errors.py")
    assert {name for name in imports if not is_stdlib(name)} <= {"runner.provider"}


def test_provider_imports_nothing_from_the_runner() -> None:
    imports = imports_of(PACKAGE / "provider.py")
    assert [name for name in imports if name.split(".")[0] == "runner"] == []
