"""Test-session hygiene shared by every test module."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs() -> Iterator[None]:
    # One process runs the whole suite and compiles thousands of programs;
    # XLA's CPU executables each hold memory mappings, and a full run once
    # crashed inside XLA's compiler (a segmentation fault) after most of the
    # suite, while the same tests passed in a process of their own. Dropping
    # the compiled programs after each module bounds what one process holds.
    yield
    jax.clear_caches()
