"""The documentation: it builds in strict mode, and the reference covers the API.

The build is the one CI runs (``sphinx -W``: any warning, such as a docstring
that does not parse or a page outside the table of contents, fails it).
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import mats_jax

DOCS = Path(__file__).resolve().parent.parent / "docs"

sphinx = pytest.importorskip("sphinx")
from sphinx.util.inventory import InventoryFile  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html")
    run = subprocess.run(
        [
            *(sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q"),
            *("-b", "html", str(DOCS), str(out)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return out


def documented_names(html: Path) -> set[str]:
    with open(html / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda base, uri: uri)
    return {name for entries in inventory.values() for name in entries}


def test_docs_build_strictly_and_reference_every_public_name(built: Path) -> None:
    names = documented_names(built)
    missing = [n for n in mats_jax.__all__ if f"mats_jax.{n}" not in names]
    assert not missing, f"not in docs/api.md: {missing}"


def needs_example(obj: object) -> bool:
    # Errors and warnings are documented by the functions that raise them.
    if inspect.isclass(obj):
        return not issubclass(obj, (Exception, Warning))
    return inspect.isfunction(obj)


def public_callables() -> list[str]:
    return [n for n in mats_jax.__all__ if needs_example(getattr(mats_jax, n))]


@pytest.mark.parametrize("name", public_callables())
def test_every_public_function_and_class_has_a_runnable_example(name: str) -> None:
    doc = inspect.getdoc(getattr(mats_jax, name)) or ""
    assert "Examples:" in doc and ">>> " in doc, f"mats_jax.{name} has no example"
