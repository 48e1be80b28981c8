"""The ``recipe-keys`` directive: the table of a recipe's keys, made at build
time from :data:`mats_jax.recipe.RECIPE_KEYS`, the schema the recipe parser
takes its allowed keys from, so the table cannot drift from the parser.

In a MyST page::

    ```{recipe-keys}
    ```
"""

from __future__ import annotations

from docutils import nodes
from markdown_block import parsed_markdown
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

from mats_jax.recipe import RECIPE_KEYS


def key_rows(prefix: str = "", section: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, meaning) for the keys of ``section`` and, after
    each key whose value is a mapping or a list of them, that mapping's keys."""
    rows: list[tuple[str, str, str, str]] = []
    for name in sorted(RECIPE_KEYS[section]):
        key = RECIPE_KEYS[section][name]
        label = f"{prefix}{name}"
        rows.append((f"`{label}`", key.type, key.default, key.meaning))
        for child in (label, f"{label}[i]"):
            if child in RECIPE_KEYS:
                rows += key_rows(f"{child}.", child)
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


class RecipeKeys(SphinxDirective):
    """The table, parsed as MyST markdown so the meanings may hold markup."""

    def run(self) -> list[nodes.Node]:
        lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in key_rows()]
        return parsed_markdown(self, lines, "recipe-keys")


def setup(app: Sphinx) -> dict[str, bool]:
    app.add_directive("recipe-keys", RecipeKeys)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
