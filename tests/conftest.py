"""Test-session hygiene shared by every test module."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import jax
import pytest

# A suite started in the background by a shell without job control inherits
# SIGINT ignored (POSIX), and Python then keeps it ignored: the interrupt
# tests (tests/test_adversarial.py) need Python's own handler, in this
# process and, through exec's reset of handled signals, in the processes it
# starts.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The command line turns on JAX's persistent compilation cache in the user's
# cache folder; tests run it in this process (CliRunner), where it would
# switch the cache on for every later test, and in subprocesses. Tests of
# the cache set it themselves.
os.environ["MATS_JAX_COMPILATION_CACHE"] = "off"


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs() -> Iterator[None]:
    # One process runs the whole suite and compiles thousands of programs;
    # XLA's CPU executables each hold memory mappings, and a full run once
    # crashed inside XLA's compiler (a segmentation fault) after most of the
    # suite, while the same tests passed in a process of their own. Dropping
    # the compiled programs after each module bounds what one process holds.
    yield
    jax.clear_caches()
