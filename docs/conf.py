"""Sphinx configuration: MyST markdown pages, API reference from the docstrings.

Build (strict: warnings are errors), from the repository root:

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx

import mats_jax

# The project's own extensions (the recipe-keys table, re-exported data's
# docstrings, the type aliases' short names, the method pages' real-model
# figures read from the benchmark's results files).
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

project = "mats_jax"
author = "the mats_jax developers"
copyright = "2026, the mats_jax developers"
release = mats_jax.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    # The API index's summary tables (no generated stub pages: every name is
    # documented on its area's page, docs/api/).
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # MathJax itself, copied into _static/mathjax (its mathjax_path): the
    # formulas render where the reader has no network, not as raw TeX.
    "sphinx-mathjax-offline",
    "recipe_keys",
    "real_model_standing",
    "reexported_data",
    "type_alias_names",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# The docstrings are Google style (Args:, Returns:, Examples:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
# The package's own type aliases (mats_jax/typing.py) by name, not as what they
# alias (``Any``): the modules' annotations are strings (``from __future__
# import annotations``), and autodoc evaluates them with these names bound to
# the aliases' documented names (docs/api/types.md); docs/_ext/type_alias_names.py
# shows them by their short names.
autodoc_type_aliases = {
    name: f"mats_jax.typing.{name}" for name in ("Array", "Params", "StatTree")
}
autosummary_generate = False

html_theme = "furo"
html_title = f"mats_jax {release}"
# Wide tables (the results pages) show that they scroll sideways.
html_static_path = ["_static"]
html_css_files = ["tables.css"]


def viewcode_back_links_to_indexed_entries(app: Sphinx, env: Any) -> list[str]:
    """Points each source page's back-links at the object's indexed entry.

    viewcode links a source block back to ``PAGE#PREFIX.NAME``: PAGE the last
    page read that describes the object, PREFIX one module name per source
    module, the one the first object read from it was documented under. Both
    can miss: a topic page that shows a function again (``:no-index:``, so
    without an anchor) can be the last page read, and a module whose objects
    are documented under two names (``tree.py``: ``mats_jax.tree.add``, and
    ``mats_jax.task_vectors`` re-exported) gets one prefix for both. Once
    every page is read, this takes for each source module the prefix most of
    its objects are indexed under and, for each object, the page of its
    indexed entry; :func:`anchor_viewcode_back_links` gives the others an
    anchor under that prefix.

    It edits viewcode's record of back-links, which has no public interface:
    if that changes, this does nothing and the link check in
    tests/test_docs.py fails.
    """
    objects = env.get_domain("py").objects
    modules = getattr(env, "_viewcode_modules", {})
    for modname, entry in modules.items():
        if not entry:  # a module viewcode could not read
            continue
        code, tags, used, refname = entry
        parts = modname.split(".")
        prefixes = [refname, *(".".join(parts[:i]) for i in range(len(parts), 0, -1))]
        prefix = max(prefixes, key=lambda p: sum(f"{p}.{n}" in objects for n in used))
        for name in used:
            indexed = [
                objects[f"{p}.{name}"] for p in prefixes if f"{p}.{name}" in objects
            ]
            if indexed:
                used[name] = objects.get(f"{prefix}.{name}", indexed[0]).docname
        modules[modname] = (code, tags, used, prefix)
    return []


def anchor_viewcode_back_links(
    app: Sphinx, doctree: nodes.document, docname: str
) -> None:
    """Gives an entry the anchor its source page's back-link names, where
    that is not its own: ``mats_jax.task_vectors`` gets
    ``#mats_jax.tree.task_vectors`` (a second anchor, no second index entry).
    It reads viewcode's record of the modules, which has no public
    interface: if that changes, this does nothing and the link check in
    tests/test_docs.py fails.
    """
    modules = getattr(app.env, "_viewcode_modules", {})
    for signature in doctree.findall(addnodes.desc_signature):
        module, fullname = signature.get("module"), signature.get("fullname")
        if not (module and fullname and signature["ids"]):  # :no-index: has no ids
            continue
        obj = sys.modules.get(module)
        for part in fullname.split("."):
            obj = getattr(obj, part, None)
        entry = modules.get(getattr(obj, "__module__", None))
        if entry:
            back_link = f"{entry[3]}.{fullname}"
            if back_link not in signature["ids"]:
                signature["ids"].append(back_link)


def setup(app: Sphinx) -> None:
    # After every page is read, before any is written.
    app.connect("env-updated", viewcode_back_links_to_indexed_entries)
    app.connect("doctree-resolved", anchor_viewcode_back_links)
