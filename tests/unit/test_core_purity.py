"""The core stays pure: no IO, threads, clocks or generated protobuf code, even indirectly.

Why a test: purity is what lets every ordering rule be tested without a kernel; one
convenient ``import os`` in a helper would quietly end that. Each module under
``uffdd/core`` is parsed with ``ast`` and its imports are followed transitively through
the ``uffdd`` package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "uffdd"
FORBIDDEN = frozenset(
    {"os", "socket", "asyncio", "grpc", "cffi", "threading", "time", "subprocess", "uffdd.v1"}
)


def _module_path(module: str) -> Path | None:
    """The source file of a ``uffdd`` module, or None (outside the package)."""
    if module != "uffdd" and not module.startswith("uffdd."):
        return None
    base = PACKAGE_ROOT.parent.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(source: str, module: str) -> set[str]:
    """Every module ``source`` imports (absolute names; relative ones resolved)."""
    found: set[str] = set()
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            if base.startswith("uffdd"):
                # ``from uffdd import v1`` imports the submodule uffdd.v1
                found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _forbidden(name: str) -> bool:
    return any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)


def violations(module: str, sources: dict[str, str] | None = None) -> list[str]:
    """Chains ``a -> b -> forbidden`` reachable from ``module`` (empty when pure).

    ``sources`` overrides module sources (for testing the checker itself).
    """
    sources = sources or {}
    seen: set[str] = set()
    bad: list[str] = []
    stack: list[tuple[str, tuple[str, ...]]] = [(module, (module,))]
    while stack:
        name, chain = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in sources:
            source = sources[name]
        else:
            path = _module_path(name)
            if path is None:
                continue
            source = path.read_text()
        for imported in sorted(_imports(source, name)):
            if _forbidden(imported):
                bad.append(" -> ".join([*chain, imported]))
            elif imported.startswith("uffdd"):
                stack.append((imported, (*chain, imported)))
    return bad


CORE_MODULES = sorted(
    "uffdd.core" if p.name == "__init__.py" else f"uffdd.core.{p.stem}"
    for p in (PACKAGE_ROOT / "core").glob("*.py")
)


def test_the_core_has_modules_to_check() -> None:
    assert {"uffdd.core.process", "uffdd.core.tracker", "uffdd.core.ranges"} <= set(CORE_MODULES)


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_nothing_impure(module: str) -> None:
    assert violations(module) == []


def test_the_checker_catches_a_direct_import() -> None:
    assert violations("fake.mod", {"fake.mod": "import os\n"}) == ["fake.mod -> os"]


def test_the_checker_catches_a_transitive_import_through_the_package() -> None:
    sources = {
        "uffdd.core.fake": "from uffdd.core import helper\n",
        "uffdd.core.helper": "from time import monotonic\n",
    }
    assert violations("uffdd.core.fake", sources) == [
        "uffdd.core.fake -> uffdd.core.helper -> time"
    ]


def test_the_checker_catches_generated_protobuf_and_submodules() -> None:
    sources = {"uffdd.core.fake": "from uffdd.v1 import image_pb2\nimport asyncio.events\n"}
    assert sorted(violations("uffdd.core.fake", sources)) == [
        "uffdd.core.fake -> asyncio.events",
        "uffdd.core.fake -> uffdd.v1",
        "uffdd.core.fake -> uffdd.v1.image_pb2",
    ]


def test_the_checker_resolves_relative_imports() -> None:
    sources = {
        "uffdd.core.fake": "from . import helper\n",
        "uffdd.core.helper": "import grpc\n",
    }
    assert violations("uffdd.core.fake", sources) == [
        "uffdd.core.fake -> uffdd.core.helper -> grpc"
    ]


def test_the_checker_follows_imports_into_the_rest_of_the_package() -> None:
    # uffdd.kernel.uffd imports os and cffi: reaching it from the core must fail.
    sources = {"uffdd.core.fake": "from uffdd.kernel.uffd import Uffd\n"}
    found = violations("uffdd.core.fake", sources)
    assert "uffdd.core.fake -> uffdd.kernel.uffd -> os" in found
