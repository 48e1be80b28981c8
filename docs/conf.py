"""Sphinx configuration: MyST markdown pages, API reference from the docstrings.

Build (strict: warnings are errors), from the repository root:

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import sys
from pathlib import Path

from sphinx.application import Sphinx

import mats_jax

# The project's own extensions (the recipe-keys table).
sys.path.insert(0, str(Path(__file__).resolve().parent / "_ext"))

project = "mats_jax"
author = "the mats_jax developers"
copyright = "2026, the mats_jax developers"
release = mats_jax.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # MathJax itself, copied into _static/mathjax (its mathjax_path): the
    # formulas render where the reader has no network, not as raw TeX.
    "sphinx-mathjax-offline",
    "recipe_keys",
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
autodoc_default_options = {"members": False}

html_theme = "furo"
html_title = f"mats_jax {release}"


def viewcode_links_to_indexed_entries(app: Sphinx) -> list[tuple[str, dict, str]]:
    """Points each source page's back-links at the object's indexed entry.

    viewcode links a source block back to the last page read that describes
    the object. A topic page that shows a function again (``:no-index:``, so
    without an anchor) can be that page, and the link then lands nowhere; the
    Python domain records the page that has the anchor. This runs before
    viewcode writes its pages and edits viewcode's record of back-links, which
    has no public interface: if that changes, this does nothing and the link
    check in tests/test_docs.py fails.
    """
    env = app.env
    objects = env.get_domain("py").objects  # type: ignore[attr-defined]
    for entry in getattr(env, "_viewcode_modules", {}).values():
        if not entry:  # a module viewcode could not read
            continue
        _, _, used, refname = entry
        for fullname in used:
            indexed = objects.get(f"{refname}.{fullname}")
            if indexed is not None:
                used[fullname] = indexed.docname
    return []


def setup(app: Sphinx) -> None:
    # Before viewcode's own html-collect-pages handler (priority 500).
    app.connect("html-collect-pages", viewcode_links_to_indexed_entries, priority=400)
