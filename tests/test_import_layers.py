"""The package layering: ``parallel/`` and ``model/`` never import ``engine/``.

``engine`` drives the ranks (it imports ``parallel`` and ``model``); every rank's loading and
forward live in ``parallel.executor`` and ``model``, so nothing there may reach back into the
engine. Read from the source with ``ast``, function-level (lazy) imports included, so a cycle
hidden inside a function body fails here rather than at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kimi_grpc"
FORBIDDEN = "kimi_grpc.engine"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(
    source: str, module: str, *, is_package: bool = False
) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in ``module``'s source, at any depth; relative imports
    resolved against its package; ``from X import Y`` yields both ``X`` and ``X.Y``."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def reaches_engine(module: str) -> bool:
    return module == FORBIDDEN or module.startswith(FORBIDDEN + ".")


@pytest.mark.parametrize("layer", ["parallel", "model"])
def test_layer_never_imports_the_engine(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    offending = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {name}"
        for path in files
        for line, name in imported_modules(
            path.read_text(), module_name(path), is_package=path.name == "__init__.py"
        )
        if reaches_engine(name)
    ]
    assert not offending, "imports of kimi_grpc.engine:\n" + "\n".join(offending)


@pytest.mark.parametrize(
    "source",
    [
        "def f():\n    from kimi_grpc.engine.llm import LLM\n",
        "import kimi_grpc.engine.llm\n",
        "from kimi_grpc import engine\n",
        "from ..engine import llm\n",
        "from .. import engine\n",
    ],
)
def test_the_check_sees_every_form_of_import(source):
    found = imported_modules(source, "kimi_grpc.parallel.worker")
    assert any(reaches_engine(name) for _, name in found)
