"""The error raised for unreadable, mismatched or unwritable checkpoints."""

from __future__ import annotations

from mats_jax.checks import MergeInputError

__all__ = ["CheckpointError"]


class CheckpointError(MergeInputError):
    """A checkpoint that cannot be read, merged or written as asked.

    The message names the file, the leaf and what to do. A subclass of
    :class:`~mats_jax.MergeInputError`, so one ``except`` catches every bad input.
    """
