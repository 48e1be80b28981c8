"""The package's type aliases by name in the API reference's parameter types.

``autodoc_type_aliases`` (docs/conf.py) has autodoc evaluate the modules'
string annotations with ``Params``, ``StatTree`` and ``Array`` bound to
placeholders named after the aliases. autodoc writes a placeholder as its
name where it is the whole annotation (``mats_jax.typing.Params``) but as its
``repr`` inside another type (``Sequence[TypeAliasForwardRef('...')]``), and
with the module either way. This rewrites each recorded annotation, before
autodoc adds it to the parameter list, so that every alias reads as its
short name (``Sequence[Params]``) and links to its entry on the types page.

It edits autodoc's record of the annotations, which has no public
interface; if that changes, the aliases show as before and the test of the
built page in tests/test_docs.py fails.
"""

from __future__ import annotations

import re
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx

PLACEHOLDER = re.compile(r"TypeAliasForwardRef\('([\w.]+)'\)")


def short_names(annotation: str, aliases: set[str]) -> str:
    """``annotation`` with each alias written ``~module.Name`` (shown ``Name``).

    Sphinx reads everything after a ``Literal`` in a parameter's type as
    text, not as names to link (a ``~`` would show): an alias there is written
    by its name alone.

    >>> short_names("Sequence[TypeAliasForwardRef('m.P')] | None", {"m.P"})
    'Sequence[~m.P] | None'
    >>> short_names("m.P", {"m.P"})
    '~m.P'
    >>> short_names("Literal['a'] | TypeAliasForwardRef('m.P')", {"m.P"})
    "Literal['a'] | P"
    """
    annotation = PLACEHOLDER.sub(r"\1", annotation)

    def short(match: re.Match[str]) -> str:
        name = match.group(0)
        if "Literal" in annotation[: match.start()]:
            return name.rsplit(".", 1)[-1]
        return f"~{name}"

    for alias in aliases:
        annotation = re.sub(rf"(?<![~\w.]){re.escape(alias)}\b", short, annotation)
    return annotation


def recorded_annotations(app: Sphinx) -> dict[str, dict[str, Any]]:
    document = getattr(app.env, "current_document", None)
    if document is not None and hasattr(document, "autodoc_annotations"):
        return document.autodoc_annotations
    return app.env.temp_data.get("annotations", {})  # Sphinx before 8.2


def rewrite_aliases(
    app: Sphinx, domain: str, objtype: str, contentnode: nodes.Element
) -> None:
    aliases = set(app.config.autodoc_type_aliases.values())
    for recorded in recorded_annotations(app).values():
        for param, annotation in recorded.items():
            if isinstance(annotation, str):
                recorded[param] = short_names(annotation, aliases)


def setup(app: Sphinx) -> dict[str, bool]:
    # Before autodoc's own handler (priority 500) turns them into fields.
    app.connect("object-description-transform", rewrite_aliases, priority=400)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
