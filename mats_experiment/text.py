"""Text-classification tasks from WordNet: which lexicographer file a gloss belongs to.

Every synset line of WordNet's ``data.noun`` and ``data.verb`` names its
lexicographer file (field 2: ``05`` is noun.animal, ``13`` noun.food, ``38``
verb.motion, …; see lexnames(5WN); the numbers are unique across the files) and ends with its gloss after ``|``. A task keeps 3–4
categories (files) and asks, from the gloss's definition alone (the text
before its quoted examples), which category the synset is in. Every task is
balanced: the same number of examples per category in each of the train,
validation and test splits, drawn from one seeded permutation per category,
so the splits never overlap.

Examples:
  >>> lines = [
  ...     "  1 This is the licence header",
  ...     "00015388 05 n 01 animal 0 000 | a living organism; \\"an example\\"",
  ...     "00017222 20 n 01 plant 0 000 | a living organism lacking locomotion",
  ... ]
  >>> read_glosses(lines)
  [(5, 'a living organism'), (20, 'a living organism lacking locomotion')]
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "LEXICOGRAPHER_FILES",
    "NOUN_FILES",
    "VERB_FILES",
    "WORDNET",
    "WORDNET_NOUNS",
    "WORDNET_VERBS",
    "TextSplit",
    "TextTask",
    "TextTaskError",
    "TextTaskSpec",
    "build_text_task",
    "check_text_specs",
    "definition",
    "load_glosses",
    "read_glosses",
]

WORDNET_NOUNS = "/usr/share/wordnet/data.noun"
"""Where Debian's ``wordnet-base`` puts the noun synsets."""

WORDNET_VERBS = "/usr/share/wordnet/data.verb"
"""… and the verb synsets."""

WORDNET = (WORDNET_NOUNS, WORDNET_VERBS)
"""The data files the tasks read by default."""

NOUN_FILES: dict[str, int] = {
    "noun.Tops": 3,
    "noun.act": 4,
    "noun.animal": 5,
    "noun.artifact": 6,
    "noun.attribute": 7,
    "noun.body": 8,
    "noun.cognition": 9,
    "noun.communication": 10,
    "noun.event": 11,
    "noun.feeling": 12,
    "noun.food": 13,
    "noun.group": 14,
    "noun.location": 15,
    "noun.motive": 16,
    "noun.object": 17,
    "noun.person": 18,
    "noun.phenomenon": 19,
    "noun.plant": 20,
    "noun.possession": 21,
    "noun.process": 22,
    "noun.quantity": 23,
    "noun.relation": 24,
    "noun.shape": 25,
    "noun.state": 26,
    "noun.substance": 27,
    "noun.time": 28,
}
"""lexnames(5WN): the noun lexicographer files and their numbers."""

VERB_FILES: dict[str, int] = {
    "verb.body": 29,
    "verb.change": 30,
    "verb.cognition": 31,
    "verb.communication": 32,
    "verb.competition": 33,
    "verb.consumption": 34,
    "verb.contact": 35,
    "verb.creation": 36,
    "verb.emotion": 37,
    "verb.motion": 38,
    "verb.perception": 39,
    "verb.possession": 40,
    "verb.social": 41,
    "verb.stative": 42,
    "verb.weather": 43,
}
"""lexnames(5WN): the verb lexicographer files and their numbers."""

LEXICOGRAPHER_FILES: dict[str, int] = {**NOUN_FILES, **VERB_FILES}
"""Every category a task can use: the numbers are unique across nouns and verbs."""


class TextTaskError(ValueError):
    """A text task that cannot be built: the message says which and why."""


def definition(gloss: str) -> str:
    """A gloss's definition: the text before its first quoted example.

    Examples:
      >>> definition('a domestic animal; "the dog barked"')
      'a domestic animal'
      >>> definition("(botany) a plant part")
      '(botany) a plant part'
    """
    cut = gloss.find('"')
    text = gloss if cut < 0 else gloss[:cut]
    return text.strip().rstrip(";").strip()


def read_glosses(lines: Iterable[str]) -> list[tuple[int, str]]:
    """(lexicographer file number, definition) of every synset line.

    Licence lines (they start with spaces) and synsets without a definition
    are skipped.
    """
    out = []
    for line in lines:
        if line.startswith(" ") or "|" not in line:
            continue
        fields, gloss = line.split("|", 1)
        text = definition(gloss)
        if text:
            out.append((int(fields.split()[1]), text))
    return out


def load_glosses(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] = WORDNET,
) -> list[tuple[int, str]]:
    """:func:`read_glosses` of WordNet data files (nouns and verbs by default).

    Raises:
      TextTaskError: if a file is missing (naming the Debian package).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[tuple[int, str]] = []
    for path in paths:
        if not os.path.isfile(path):
            raise TextTaskError(
                f"{path}: no WordNet data file; install Debian's wordnet-base "
                "(apt-get install wordnet-base)"
            )
        with open(path, encoding="utf-8", errors="replace") as f:
            out.extend(read_glosses(f))
    return out


@dataclasses.dataclass(frozen=True)
class TextTaskSpec:
    """A task: its name, its categories (labels 0…c−1 in this order), examples per category.

    Attributes:
      name: the task's name in tables and errors.
      categories: lexicographer file names of :data:`LEXICOGRAPHER_FILES`.
      per_class: examples per category in (train, val, test).
    """

    name: str
    categories: tuple[str, ...]
    per_class: tuple[int, int, int] = (200, 50, 100)

    @property
    def sizes(self) -> tuple[int, int, int]:
        """Examples in (train, val, test)."""
        n = len(self.categories)
        a, b, c = self.per_class
        return (a * n, b * n, c * n)


@dataclasses.dataclass(frozen=True)
class TextSplit:
    texts: tuple[str, ...]
    y: np.ndarray


@dataclasses.dataclass(frozen=True)
class TextTask:
    spec: TextTaskSpec
    train: TextSplit
    val: TextSplit
    test: TextSplit

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_classes(self) -> int:
        return len(self.spec.categories)


def check_text_specs(specs: Sequence[TextTaskSpec]) -> None:
    """Names unique, categories known, at least two per task, disjoint across tasks.

    Raises:
      TextTaskError: naming the task and the offending entry.

    Examples:
      >>> check_text_specs([TextTaskSpec("a", ("noun.animal", "noun.plant")),
      ...                   TextTaskSpec("b", ("noun.plant", "noun.food"))])
      Traceback (most recent call last):
      ...
      mats_experiment.text.TextTaskError: task 'b': category 'noun.plant' is also in task 'a'; tasks need disjoint categories
    """
    owner: dict[str, str] = {}
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise TextTaskError(f"task names must be unique, got {names}")
    for s in specs:
        if len(s.categories) < 2 or len(set(s.categories)) != len(s.categories):
            raise TextTaskError(
                f"task {s.name!r}: needs at least two distinct categories, got {s.categories}"
            )
        if len(s.per_class) != 3 or min(s.per_class) < 1:
            raise TextTaskError(
                f"task {s.name!r}: per_class must be three positive counts "
                f"(train, val, test), got {s.per_class}"
            )
        for c in s.categories:
            if c not in LEXICOGRAPHER_FILES:
                raise TextTaskError(
                    f"task {s.name!r}: unknown category {c!r}; known: "
                    f"{', '.join(LEXICOGRAPHER_FILES)}"
                )
            if c in owner:
                raise TextTaskError(
                    f"task {s.name!r}: category {c!r} is also in task {owner[c]!r}; "
                    "tasks need disjoint categories"
                )
            owner[c] = s.name


def _seed(name: str, seed: int) -> int:
    # A stable stream per (category, seed): Python's hash() of a str changes per process.
    return zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1 & 0xFFFFFFFF)


def build_text_task(
    spec: TextTaskSpec, glosses: Sequence[tuple[int, str]], seed: int
) -> TextTask:
    """Balanced train/val/test splits of ``spec``'s categories from ``glosses``.

    Raises:
      TextTaskError: if a category has fewer glosses than its three splits need.

    Examples:
      >>> glosses = [(5, f"animal {i}") for i in range(6)] + [(20, f"plant {i}") for i in range(6)]
      >>> task = build_text_task(TextTaskSpec("t", ("noun.animal", "noun.plant"), (2, 1, 1)), glosses, 0)
      >>> task.train.y.tolist().count(0), len(task.val.texts), sorted(set(task.test.y.tolist()))
      (2, 2, [0, 1])
    """
    check_text_specs([spec])
    needed = sum(spec.per_class)
    cuts = np.cumsum(spec.per_class)[:-1]
    parts: list[list[tuple[str, int]]] = [[], [], []]
    for label, category in enumerate(spec.categories):
        texts = [t for f, t in glosses if f == LEXICOGRAPHER_FILES[category]]
        if len(texts) < needed:
            raise TextTaskError(
                f"task {spec.name!r}: category {category!r} has {len(texts)} glosses, "
                f"fewer than train+val+test = {needed}"
            )
        order = np.random.default_rng(_seed(category, seed)).permutation(len(texts))
        for part, idx in zip(parts, np.split(order[:needed], cuts), strict=True):
            part.extend((texts[i], label) for i in idx)
    splits = []
    for k, part in enumerate(parts):
        # Shuffled so that training batches mix the categories.
        order = np.random.default_rng(_seed(spec.name, seed * 3 + k)).permutation(
            len(part)
        )
        splits.append(
            TextSplit(
                tuple(part[i][0] for i in order),
                np.array([part[i][1] for i in order], np.int32),
            )
        )
    return TextTask(spec, *splits)
