"""What the project's directives share: generated MyST lines parsed into the page.

Not an extension itself: ``recipe_keys`` and ``real_model_standing`` import it
(``docs/_ext`` is on the path of ``docs/conf.py``).
"""

from __future__ import annotations

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


def parsed_markdown(
    directive: SphinxDirective, lines: list[str], css_class: str
) -> list[nodes.Node]:
    """``lines`` (MyST markdown, e.g. a table) parsed in ``directive``'s place,
    in a container of class ``css_class`` (for the tests that read it back)."""
    container = nodes.container(classes=[css_class])
    directive.state.nested_parse(
        StringList(lines, source=directive.get_source_info()[0]),
        directive.content_offset,
        container,
    )
    return [container]
