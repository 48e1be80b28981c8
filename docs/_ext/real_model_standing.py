"""The ``real-model-standing`` directive: where each named method landed on
the real-model benchmark, read at build time from the benchmark's own
results files (``benchmarks/results/real_model.md``, ``_lora.md``,
``_ia3.md``), so a method page quotes no figure by hand and cannot drift
from the recorded runs.

In a MyST page, one method label (as the results tables name it) a line::

    ```{real-model-standing}
    TIES
    TIES, IA³ vectors
    ```

The table has a row per label and fine-tuning (full, LoRA, IA³) whose
multitask table holds that label: its average normalised test accuracy
(mean ± s.d. over seeds) and its rank there. A label no results file
holds is an error, so a renamed method fails the strict build.
"""

from __future__ import annotations

import re
from pathlib import Path

from docutils import nodes
from markdown_block import parsed_markdown
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"

# The fine-tuning each results file records, in the order the rows show them.
FILES = (
    ("full", "real_model.md"),
    ("LoRA", "real_model_lora.md"),
    ("IA³", "real_model_ia3.md"),
)

RUN = re.compile(r"^- date: (\d{4}-\d{2}-\d{2})[^;]*; git: `(\w+)`", re.M)


def multitask_rows(text: str) -> list[tuple[str, str]]:
    """(method label, average normalised cell) of the ``## Multitask
    merging`` table, best first, without the baselines' rows (the merged
    rows' averages are bold)."""
    section = text.split("## Multitask merging", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[-1].startswith("**"):
            rows.append((cells[0], cells[-1].strip("*")))
    return rows


class RealModelStanding(SphinxDirective):
    has_content = True

    def run(self) -> list[nodes.Node]:
        runs = []
        for finetune, name in FILES:
            path = RESULTS / name
            self.env.note_dependency(str(path))
            text = path.read_text(encoding="utf-8")
            found = RUN.search(text)
            if found is None:
                raise self.error(f"{path}: no '- date: …; git: `…`' line")
            runs.append((finetune, name, found.groups(), multitask_rows(text)))
        lines = [
            "| method | fine-tuning (results file: run date, commit) "
            "| avg. normalised test accuracy | rank |",
            "|---|---|---|---|",
        ]
        for label in (line.strip() for line in self.content if line.strip()):
            rows = 0
            for finetune, name, (date, commit), table in runs:
                labels = [row[0] for row in table]
                if label in labels:
                    rank = labels.index(label)
                    lines.append(
                        f"| {label} | {finetune} (`{name}`: {date}, `{commit}`) "
                        f"| {table[rank][1]} | {rank + 1} of {len(table)} |"
                    )
                    rows += 1
            if not rows:
                raise self.error(f"no real-model results file has a row {label!r}")
        return parsed_markdown(self, lines, "real-model-standing")


def setup(app: Sphinx) -> dict[str, bool]:
    app.add_directive("real-model-standing", RealModelStanding)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
