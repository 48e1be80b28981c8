"""Classification tasks built from the shipped datasets: class groups and fixed transforms.

A :class:`TaskSpec` names a source (:mod:`mats_experiment.data`), the
classes it keeps (relabelled 0…c−1 in the order given), a fixed input
transformation, and how many examples go to its train, validation and test
splits. :func:`build_task` draws the splits from one seeded permutation, so
they never overlap; hyperparameters are chosen on ``val`` and ``test`` is
only ever reported.

Examples:
  >>> import numpy as np
  >>> spec = TaskSpec("toy", "toy", classes=(3, 1), sizes=(4, 2, 2))
  >>> images = np.arange(12 * 4, dtype=np.float32).reshape(12, 2, 2) / 48
  >>> labels = np.array([1, 3, 5] * 4)
  >>> task = build_task(spec, (images, labels), seed=0)
  >>> sorted(set(task.train.y.tolist())), task.num_classes, task.test.x.shape
  ([0, 1], 2, (2, 2, 2))
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "PATCH",
    "TRANSFORMS",
    "Split",
    "Task",
    "TaskSpec",
    "build_task",
    "check_specs",
    "permute_within_patches",
]

PATCH = 7  # the ViT's patch side: a within-patch permutation keeps patches intact


def permute_within_patches(images: np.ndarray, seed: int) -> np.ndarray:
    """One fixed permutation of the pixels inside every 7×7 patch.

    The same permutation for every patch, so a model can undo it exactly by
    permuting the rows of its first layer (the MLP's input layer, the ViT's
    patch embedding): the task is as learnable as the original, but features
    learnt on unpermuted images no longer fit it.

    Examples:
      >>> x = np.arange(2 * 28 * 28, dtype=np.float32).reshape(2, 28, 28)
      >>> y = permute_within_patches(x, seed=0)
      >>> bool(np.array_equal(np.sort(y[:, :7, :7], axis=None), np.sort(x[:, :7, :7], axis=None)))
      True
    """
    n, h, w = images.shape
    gh, gw = h // PATCH, w // PATCH
    perm = np.random.default_rng(seed).permutation(PATCH * PATCH)
    patches = images.reshape(n, gh, PATCH, gw, PATCH).transpose(0, 1, 3, 2, 4)
    patches = patches.reshape(n, gh, gw, PATCH * PATCH)[..., perm]
    return (
        patches.reshape(n, gh, gw, PATCH, PATCH)
        .transpose(0, 1, 3, 2, 4)
        .reshape(n, h, w)
    )


TRANSFORMS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "none": lambda x, _: x,
    "invert": lambda x, _: 1.0 - x,
    "rotate90": lambda x, _: np.rot90(x, k=1, axes=(1, 2)).copy(),
    "flip": lambda x, _: x[:, :, ::-1].copy(),
    "permute": permute_within_patches,
}


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What a task is made of.

    Attributes:
      name: the task's name in tables and errors.
      source: a dataset name of :data:`mats_experiment.data.SOURCES`.
      classes: the source classes kept, relabelled 0…c−1 in this order
        (None: every class, labels unchanged).
      transform: a key of :data:`TRANSFORMS`, applied to every image
        ("permute" draws its permutation from the task's name).
      sizes: examples in (train, val, test).
    """

    name: str
    source: str
    classes: tuple[int, ...] | None = None
    transform: str = "none"
    sizes: tuple[int, int, int] = (1000, 300, 400)


@dataclasses.dataclass(frozen=True)
class Split:
    x: np.ndarray
    y: np.ndarray


@dataclasses.dataclass(frozen=True)
class Task:
    spec: TaskSpec
    num_classes: int
    train: Split
    val: Split
    test: Split

    @property
    def name(self) -> str:
        return self.spec.name


def check_specs(specs: Sequence[TaskSpec], known_sources: Sequence[str]) -> None:
    """Validates specs without loading data: names, sources, transforms, sizes."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    for s in specs:
        if s.source not in known_sources:
            raise ValueError(
                f"task {s.name!r}: unknown source {s.source!r}; known: {', '.join(known_sources)}"
            )
        if s.transform not in TRANSFORMS:
            raise ValueError(
                f"task {s.name!r}: unknown transform {s.transform!r}; known: {', '.join(TRANSFORMS)}"
            )
        if len(s.sizes) != 3 or min(s.sizes) < 1:
            raise ValueError(
                f"task {s.name!r}: sizes must be three positive counts (train, val, test), got {s.sizes}"
            )
        if s.classes is not None and (
            len(s.classes) < 2 or len(set(s.classes)) != len(s.classes)
        ):
            raise ValueError(
                f"task {s.name!r}: classes must be at least two distinct labels, got {s.classes}"
            )


def _seed(name: str, seed: int) -> int:
    # A stable per-task stream: Python's hash() of a string changes per process.
    return zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1 & 0xFFFFFFFF)


def build_task(spec: TaskSpec, data: tuple[np.ndarray, np.ndarray], seed: int) -> Task:
    """Filters, relabels, transforms and splits ``data`` = (images, labels)."""
    images, labels = data
    if spec.classes is None:
        keep = np.arange(labels.shape[0])
        new_labels = labels
        num_classes = int(labels.max()) + 1
    else:
        lookup: Mapping[int, int] = {c: i for i, c in enumerate(spec.classes)}
        keep = np.flatnonzero(np.isin(labels, spec.classes))
        new_labels = np.array([lookup.get(int(c), -1) for c in labels], np.int32)
        num_classes = len(spec.classes)
    needed = sum(spec.sizes)
    if keep.size < needed:
        raise ValueError(
            f"task {spec.name!r}: {spec.source} has {keep.size} examples of the chosen "
            f"classes, fewer than train+val+test = {needed}"
        )
    order = np.random.default_rng(_seed(spec.name, seed)).permutation(keep)[:needed]
    # The transform depends on the task's name only, not on the seed: a task
    # is the same task in every seed.
    transform_seed = zlib.crc32(spec.name.encode())
    x = TRANSFORMS[spec.transform](images[order], transform_seed).astype(np.float32)
    y = new_labels[order].astype(np.int32)
    a, b = spec.sizes[0], spec.sizes[0] + spec.sizes[1]
    return Task(
        spec,
        num_classes,
        Split(x[:a], y[:a]),
        Split(x[a:b], y[a:b]),
        Split(x[b:], y[b:]),
    )
