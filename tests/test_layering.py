"""The package's layers, held by reading its imports (no module is imported here).

Every module of mats_jax has a layer (``LAYERS``, bottom first). A module may
import only modules of lower layers: nothing runs back up, so a reader can
read the package bottom-up and a module can be tested with what lies below
it. No module uses another module's private (``_``) name, in mats_jax, in the
experiments (an application: it may use only the public API) or in the tests
and benchmarks.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

import mats_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, ...]] = [
    ("mats_jax.typing",),
    ("mats_jax.tree",),
    ("mats_jax.stats.statistic",),
    ("mats_jax.checks",),
    ("mats_jax.stats.likelihood", "mats_jax.stats.capture"),
    ("mats_jax.stats.accumulate",),
    ("mats_jax.stats.estimate",),
    (
        "mats_jax.stats.fisher",
        "mats_jax.stats.kronecker",
        "mats_jax.stats.io",
        "mats_jax.stats.summary",
        "mats_jax.stats.rescale",
    ),
    ("mats_jax.stats",),
    ("mats_jax.sharding",),
    ("mats_jax.io.errors", "mats_jax.io.layout"),
    ("mats_jax.io.safetensors", "mats_jax.io.msgpack", "mats_jax.io.orbax"),
    ("mats_jax.io.statistics", "mats_jax.io.checkpoint"),
    ("mats_jax.io.adapters",),
    ("mats_jax.io",),
    ("mats_jax.solver.options", "mats_jax.solver.cg"),
    ("mats_jax.solver.report", "mats_jax.solver.blocking"),
    ("mats_jax.solver.solve",),
    ("mats_jax.solver",),
    ("mats_jax.select",),
    ("mats_jax.method",),
    ("mats_jax.engine",),
    ("mats_jax.merge.linear", "mats_jax.merge.subspace"),
    (
        "mats_jax.merge.sparse",
        "mats_jax.merge.fisher",
        "mats_jax.merge.regmean",
        "mats_jax.merge.mats",
        "mats_jax.merge.slerp",
        "mats_jax.merge.svd",
    ),
    ("mats_jax.merge.model_stock",),  # its angles use slerp's unit_and_norm
    ("mats_jax.merge.breadcrumbs", "mats_jax.merge.della"),  # sparse's combine
    ("mats_jax.merge.registry",),
    ("mats_jax.merge",),
    ("mats_jax.recipe",),
    ("mats_jax.mergekit",),
    ("mats_jax.stream",),
    ("mats_jax.cli",),
    ("mats_jax",),
]
"""The layers, bottom first; a module imports only from layers below its own."""

RANK = {module: i for i, layer in enumerate(LAYERS) for module in layer}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(package: str) -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


PACKAGE = _modules("mats_jax")


def _imports(path: pathlib.Path) -> list[tuple[str, str | None, int]]:
    """(module, imported name or None, line) for every mats_jax import in ``path``,
    including imports inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "mats_jax"
        ):
            assert node.module is not None
            for alias in node.names:
                out.append((node.module, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mats_jax"):
                    out.append((alias.name, None, node.lineno))
    return out


def _target(module: str, name: str | None) -> str:
    """The module an import reaches: ``from a import b`` reaches ``a.b`` if that is a module."""
    if name is not None and f"{module}.{name}" in PACKAGE:
        return f"{module}.{name}"
    return module


def test_every_module_has_a_layer() -> None:
    missing = sorted(set(PACKAGE) - set(RANK))
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"
    stale = sorted(set(RANK) - set(PACKAGE))
    assert not stale, f"LAYERS names modules that do not exist: {stale}"


@pytest.mark.parametrize("module", sorted(PACKAGE))
def test_no_module_imports_one_above_or_beside_it(module: str) -> None:
    wrong = []
    for imported, name, line in _imports(PACKAGE[module]):
        target = _target(imported, name)
        if target in RANK and RANK[target] >= RANK[module]:
            wrong.append(f"line {line}: {target} (layer {RANK[target]})")
    assert not wrong, f"{module} (layer {RANK[module]}) imports upward: {wrong}"


def _private_uses(path: pathlib.Path) -> list[str]:
    """``from mats_jax.x import _y``, and ``m._y`` for a name bound to a mats_jax module."""
    tree = ast.parse(path.read_text())
    modules: set[str] = set()
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "mats_jax"
        ):
            for alias in node.names:
                if alias.name.startswith("_"):
                    uses.append(f"line {node.lineno}: {node.module}.{alias.name}")
                if _target(node.module or "", alias.name) != node.module:
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("mats_jax"):
                    modules.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                uses.append(f"line {node.lineno}: {ast.unparse(node)}")
    return uses


SOURCES = {
    _module_name(p): p
    for folder in ("mats_jax", "mats_experiment", "tests", "benchmarks")
    for p in sorted((ROOT / folder).rglob("*.py"))
}


@pytest.mark.parametrize("module", sorted(SOURCES))
def test_no_private_name_crosses_modules(module: str) -> None:
    uses = _private_uses(SOURCES[module])
    assert not uses, f"{module} uses private names of mats_jax modules: {uses}"


PUBLIC_MODULES = {"mats_jax", "mats_jax.tree", "mats_jax.typing"}


@pytest.mark.parametrize("module", sorted(_modules("mats_experiment")))
def test_the_experiments_use_only_the_public_api(module: str) -> None:
    path = _modules("mats_experiment")[module]
    wrong = [
        f"line {line}: {imported}"
        for imported, name, line in _imports(path)
        if _target(imported, name) not in PUBLIC_MODULES
    ]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "mats_jax"
            and node.attr not in mats_jax.__all__
            and f"mats_jax.{node.attr}" not in PUBLIC_MODULES
        ):
            wrong.append(f"line {node.lineno}: mats_jax.{node.attr}")
    assert not wrong, f"{module} reaches past the public API: {wrong}"
