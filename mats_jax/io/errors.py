"""The error raised for unreadable, mismatched or unwritable checkpoints, and
the checks of output paths that raise it before anything is written."""

from __future__ import annotations

import os

from mats_jax.checks import MergeInputError

__all__ = ["CheckpointError", "check_parent", "check_replaceable"]


class CheckpointError(MergeInputError):
    """A checkpoint that cannot be read, merged or written as asked.

    The message names the file, the leaf and what to do. A subclass of
    :class:`~mats_jax.MergeInputError`, so one ``except`` catches every bad input.
    """


def check_replaceable(path: str) -> None:
    """Refuses to replace the working directory or a directory holding it (an
    output path of ``""`` or ``"."`` with ``overwrite``).

    Raises:
      CheckpointError: naming the path.
    """
    try:
        cwd = os.path.realpath(os.getcwd())
    except FileNotFoundError:  # the working directory was removed
        return
    real = os.path.realpath(path)
    if cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep):
        raise CheckpointError(
            f"{path}: refusing to replace the working directory (or a directory "
            "holding it) with a checkpoint; give the output its own path"
        )


def check_parent(path: str) -> None:
    """Refuses an output whose nearest existing ancestor is not a directory.

    Raises:
      CheckpointError: naming the file in the way.
    """
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise CheckpointError(
            f"{path}: {ancestor} is a file, so no directory can be made there"
        )
