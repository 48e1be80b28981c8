"""Docstrings for the data the package re-exports (``mats_jax.METHODS``,
``mats_jax.MAX_FACTOR_SIZE``, ``mats_jax.STATUS_NAMES``).

autodoc reads a variable's docstring (the string literal after its
assignment) from the source of the module it documents the name in. A name
re-exported by ``mats_jax/__init__.py`` has its docstring in the module that
assigns it, so autodoc finds none and shows the docstring of the value's type
instead (``int([x]) -> integer``). This puts the assigning module's docstring
in its place: the module of the package that holds the same object under the
same name and has a docstring for it.
"""

from __future__ import annotations

import sys
from typing import Any

from sphinx.application import Sphinx
from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer

PACKAGE = "mats_jax"


def assigned_docstring(name: str, obj: Any) -> list[str] | None:
    """The docstring of ``name`` in the package's module that assigns ``obj``
    to it, or None if no module does."""
    for modname, module in sorted(sys.modules.items()):
        if not modname.startswith(PACKAGE) or getattr(module, name, None) is not obj:
            continue
        try:
            docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except PycodeError:
            continue
        if ("", name) in docs:
            return list(docs["", name])
    return None


def use_assigned_docstring(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    if what != "data" or not name.startswith(f"{PACKAGE}."):
        return
    found = assigned_docstring(name.rsplit(".", 1)[1], obj)
    if found is not None:
        lines[:] = found


def setup(app: Sphinx) -> dict[str, bool]:
    app.connect("autodoc-process-docstring", use_assigned_docstring)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
