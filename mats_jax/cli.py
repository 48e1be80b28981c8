"""The ``mats-jax`` command line: ``merge``, ``convert``, ``extract-lora``, ``inspect`` and ``demo``.

``mats-jax merge RECIPE -o OUT [--overwrite]`` runs a YAML recipe
(:mod:`mats_jax.recipe`, or a mergekit recipe: :mod:`mats_jax.mergekit`) as
a streaming merge (:mod:`mats_jax.stream`) with progress bars for reading,
merging and writing; ``mats-jax convert MERGEKIT_RECIPE [-o OUT]`` writes
the mats_jax recipe a mergekit one becomes; ``mats-jax extract-lora BASE
MERGED --rank R -o OUT`` writes a model's change to its base as a PEFT LoRA
(:func:`mats_jax.extract_lora`); ``mats-jax inspect CHECKPOINT``
prints a checkpoint's leaves, shapes, dtypes and size; ``mats-jax demo`` runs
:mod:`mats_experiment.demo` (added by that package's ``mats_jax.commands``
entry point). Bad input exits with status 2 and a one-paragraph
message naming the file, the leaf or the recipe line, and what to do.

Compilation cache. A streamed merge compiles its solve (and checks) once
per distinct leaf shape, and every command is a new process, so without a
cache each run compiles them all again (about 8 of the 12 s of a streamed
MaTS merge of a small model). The command line turns on JAX's persistent
compilation cache (:func:`compilation_cache_dir`), in
``$XDG_CACHE_HOME/mats_jax/jax`` (``~/.cache/mats_jax/jax``) by default,
bounded to 1 GiB (least recently used entries go first) and caching every
program however quick to compile. ``MATS_JAX_COMPILATION_CACHE=DIR`` puts it
elsewhere, ``MATS_JAX_COMPILATION_CACHE=off`` turns it off, and a cache set
through JAX's own ``JAX_COMPILATION_CACHE_DIR`` is used as it is. The
library itself never changes JAX's configuration: a program that merges in
its own process turns the cache on as JAX documents
(``jax.config.update("jax_compilation_cache_dir", ...)``).
"""

from __future__ import annotations

import importlib.metadata
import os
import signal
import sys
import threading
from collections.abc import Mapping

import click
import jax
import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from mats_jax.checks import MergeInputError
from mats_jax.io.checkpoint import CHECKSUMS
from mats_jax.stream import Progress as MergeProgress

__all__ = ["compilation_cache_dir", "main"]

CACHE_ENV = "MATS_JAX_COMPILATION_CACHE"
CACHE_MAX_BYTES = 1 << 30

_STAGES = {
    "threshold": "TIES threshold",
    "read": "read",
    "merge": "merge",
    "write": "write",
}


class Interruption:
    """SIGINT and SIGTERM during a merge, raised where they cannot be lost.

    Python runs a signal handler between two bytecodes of the main thread.
    When those are inside a garbage-collector callback (JAX registers one),
    the exception the handler raises is printed as "ignored" and dropped,
    and the merge would go on to commit its output. So the handler records
    the signal as well as raising it, and :meth:`check`, called by every
    progress hook, raises it again on the main thread: at the latest when
    the next leaf is read, and when the stages finish, before the model card
    is written and the output committed (a signal handled in the short
    stretch after that is not caught again). SIGINT raises
    ``KeyboardInterrupt``, SIGTERM exits with status 128 + 15, each unwinding
    like an interrupted merge (the temporary output is removed; Python's
    default SIGTERM would skip that).

    Examples:
      >>> stop = Interruption()
      >>> stop.check()  # no signal yet: nothing happens
      >>> stop.signum = signal.SIGTERM  # as the handler records it
      >>> stop.check()
      Traceback (most recent call last):
      SystemExit: 143
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def handle(self, signum: int, frame: object) -> None:
        self.signum = signum
        self._raise()

    def check(self) -> None:
        if (
            self.signum is not None
            and threading.current_thread() is threading.main_thread()
        ):
            self._raise()

    def _raise(self) -> None:
        if self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + int(self.signum or 0))


class RichProgress(MergeProgress):
    """The merge engine's progress hooks drawn as rich bars with sizes and rates.

    Each hook first gives ``interruption`` (if any) its :meth:`Interruption.check`.
    """

    def __init__(
        self, progress: Progress, interruption: Interruption | None = None
    ) -> None:
        super().__init__()
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}
        self._interruption = interruption or Interruption()

    def start(self, stage: str, total: int) -> None:
        self._interruption.check()
        self._tasks[stage] = self._progress.add_task(
            _STAGES.get(stage, stage), total=total
        )

    def advance(self, stage: str, nbytes: int) -> None:
        self._interruption.check()
        if stage in self._tasks:
            self._progress.advance(self._tasks[stage], nbytes)

    def finish(self, stage: str) -> None:
        self._interruption.check()
        if stage in self._tasks:
            task = self._tasks[stage]
            self._progress.update(task, completed=self._progress.tasks[task].total)


def _bars(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:>15}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _fail(error: BaseException | str) -> None:
    click.echo(f"mats-jax: error: {error}", err=True)
    sys.exit(2)


class _Commands(click.Group):
    """The built-in commands and those other installed packages add through the
    ``mats_jax.commands`` entry points (e.g. the demo, from mats_experiment),
    loaded only when run, so the library never imports its applications."""

    def _plugins(self) -> dict[str, importlib.metadata.EntryPoint]:
        return {
            ep.name: ep
            for ep in importlib.metadata.entry_points(group="mats_jax.commands")
        }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._plugins()})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None and name in self._plugins():
            command = self._plugins()[name].load()()
        return command


def compilation_cache_dir(environ: Mapping[str, str] = os.environ) -> str | None:
    """The directory of the command line's persistent compilation cache, or None.

    ``MATS_JAX_COMPILATION_CACHE`` names it (``off``, ``0``, ``false``,
    ``no`` or empty: no cache); otherwise ``$XDG_CACHE_HOME/mats_jax/jax``,
    ``~/.cache/mats_jax/jax`` without ``XDG_CACHE_HOME``. None, too, when
    JAX's own ``JAX_COMPILATION_CACHE_DIR`` is set: JAX then uses that one.

    Examples:
      >>> compilation_cache_dir({"XDG_CACHE_HOME": "/var/cache/me"})
      '/var/cache/me/mats_jax/jax'
      >>> compilation_cache_dir({"MATS_JAX_COMPILATION_CACHE": "off"}) is None
      True
    """
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    if CACHE_ENV in environ:
        chosen = environ[CACHE_ENV].strip()
        if chosen.lower() in ("", "0", "off", "false", "no"):
            return None
        return os.path.abspath(os.path.expanduser(chosen))
    root = environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return os.path.join(root, "mats_jax", "jax")


def _use_compilation_cache() -> None:
    directory = compilation_cache_dir()
    if directory is None:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    # JAX caches only programs that took a second or more to compile; a
    # merge's are 0.1-0.3 s each, dozens of them.
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mats_jax")
def main() -> None:
    """Merge fine-tuned JAX/Flax and Hugging Face checkpoints (mats_jax).

    Compiled programs are cached across runs in ~/.cache/mats_jax/jax
    (MATS_JAX_COMPILATION_CACHE=DIR elsewhere, =off for none).
    """
    _use_compilation_cache()


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    default=None,
    help="Output directory (default: the recipe's output.path).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option(
    "--checksum",
    type=click.Choice([*CHECKSUMS, "none"]),
    default="sha256",
    show_default=True,
    help="The digest of the inputs the model card records: sha256 (what the "
    "Hugging Face hub lists), blake3 (needs the blake3 package; faster), or none.",
)
@click.option(
    "--no-checksums",
    is_flag=True,
    help="The same as --checksum none.",
)
def merge(
    recipe: str,
    output: str | None,
    overwrite: bool,
    quiet: bool,
    checksum: str,
    no_checksums: bool,
) -> None:
    """Merge the checkpoints a YAML RECIPE names, one leaf at a time."""
    from mats_jax.mergekit import read_recipe
    from mats_jax.stream import merge_recipe

    console = Console(stderr=True, quiet=quiet)
    interruption = Interruption()
    previous = {
        s: signal.signal(s, interruption.handle)
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        parsed = read_recipe(recipe)
        with _bars(console) as bars:
            summary = merge_recipe(
                parsed,
                output,
                overwrite=overwrite,
                progress=RichProgress(bars, interruption),
                checksum=None if no_checksums or checksum == "none" else checksum,
            )
    except (MergeInputError, FileExistsError, FileNotFoundError) as e:
        _fail(e)
    except (
        OSError
    ) as e:  # a full disk, a permission lost mid-run: one line, nothing left
        where = f" ({e.filename})" if e.filename else ""
        _fail(
            f"writing the output failed: {e.strerror or e}{where}; nothing was written"
        )
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    console.print(
        f"wrote {summary.output}: {summary.leaves} leaves, "
        f"{summary.bytes_written / 2**20:.1f} MiB, model card README.md"
    )


@main.command()
@click.argument("mergekit_recipe", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the recipe here (default: print it).",
)
def convert(mergekit_recipe: str, output: str | None) -> None:
    """Convert a mergekit YAML recipe into a mats_jax recipe.

    ``mats-jax merge`` runs mergekit recipes directly; this shows (or saves,
    to edit) the recipe it runs. Keys with no counterpart are an error
    naming the line.
    """
    from mats_jax.mergekit import convert_mergekit
    from mats_jax.recipe import parse_recipe, recipe_text

    try:
        text = convert_mergekit(recipe_text(mergekit_recipe), source=mergekit_recipe)
        parse_recipe(text, source=output or "<converted recipe>")  # it must be valid
    except (MergeInputError, FileNotFoundError, IsADirectoryError) as e:
        _fail(e)
    if output is None:
        click.echo(text, nl=False)
        return
    if os.path.exists(output):
        _fail(f"{output} exists; remove it or choose another path")
    with open(output, "x") as f:
        f.write(text)


@main.command("extract-lora")
@click.argument("base", type=click.Path())
@click.argument("merged", type=click.Path())
@click.option(
    "-o", "--output", type=click.Path(), required=True, help="The adapter folder."
)
@click.option("-r", "--rank", type=int, required=True, help="The LoRA rank r (≥ 1).")
@click.option(
    "--layout",
    default="hf_linear",
    show_default=True,
    help="The base checkpoint's layout preset (names the adapter's modules).",
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    help="A leaf-path pattern of the kernels to extract (repeatable; default: "
    "every linear kernel that changed).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def extract_lora_command(
    base: str,
    merged: str,
    output: str,
    rank: int,
    layout: str,
    targets: tuple[str, ...],
    overwrite: bool,
) -> None:
    """Write MERGED's change to BASE as a PEFT LoRA of rank R (truncated SVD).

    Each module's relative error is printed and written in the adapter's
    README.md; leaves that changed but a LoRA cannot hold (biases, norms)
    are listed.
    """
    from mats_jax.io import extract_lora, save_lora

    try:
        lora = extract_lora(
            base, merged, rank=rank, layout=layout, targets=list(targets) or None
        )
        save_lora(output, lora, overwrite=overwrite)
    except (MergeInputError, FileExistsError, FileNotFoundError) as e:
        _fail(e)
    click.echo(lora.report())
    click.echo(f"wrote {output}")


@main.command("inspect")
@click.argument("checkpoint", type=click.Path())
@click.option(
    "--layout",
    default=None,
    help="A layout preset (hf_bert, hf_llama, hf_linear, nnx_state).",
)
def inspect_checkpoint(checkpoint: str, layout: str | None) -> None:
    """Print a CHECKPOINT's leaves: path, shape, dtype and size.

    A statistics checkpoint (mats_jax.save_statistics) is described per
    leaf: its statistic type, the arrays' shapes and the kernel's axes.
    """
    from mats_jax.io import open_checkpoint
    from mats_jax.stats.io import is_statistics

    if is_statistics(checkpoint):
        if layout is not None:
            _fail(
                f"{checkpoint}: a statistics checkpoint is keyed by parameter paths; "
                "--layout applies to parameter checkpoints only"
            )
        _inspect_statistics(checkpoint)
        return
    try:
        ckpt = open_checkpoint(checkpoint, layout=layout)
    except MergeInputError as e:
        _fail(e)
    table = Table(title=f"{ckpt.path} ({ckpt.format})")
    for column in ("leaf", "shape", "dtype", "size"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for path, info in ckpt.leaves.items():
        n = int(np.prod(info.shape, dtype=np.int64)) * info.dtype.itemsize
        table.add_row(path, str(list(info.shape)), str(info.dtype), _size(n))
    console = Console()
    console.print(table)
    n_params = sum(int(np.prod(i.shape, dtype=np.int64)) for i in ckpt.leaves.values())
    console.print(
        f"{len(ckpt.leaves)} leaves, {n_params:,} parameters, {_size(ckpt.nbytes)} "
        f"in {len(ckpt.files)} file(s)"
    )


def _inspect_statistics(path: str) -> None:
    """Prints a statistics checkpoint's leaves from its metadata alone."""
    from mats_jax.io import StatisticsReader

    try:
        reader = StatisticsReader(path)
        stats = {leaf: reader.abstract(leaf) for leaf in reader.leaves}
    except MergeInputError as e:
        _fail(e)
    table = Table(title=f"{reader.path} (statistics)")
    for column in ("leaf", "statistic", "arrays", "axes", "size"):
        table.add_column(column, justify="right" if column == "size" else "left")
    total = 0
    for leaf, stat in stats.items():
        if stat is None:
            table.add_row(leaf, "none (fallback)", "-", "-", "-")
            continue
        arrays = [(f, getattr(stat, f)) for f in stat.array_fields]
        n = sum(
            int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
            for _, a in arrays
        )
        total += n
        axes = ", ".join(f"{f}={list(getattr(stat, f))}" for f in stat.layout_fields)
        table.add_row(
            leaf,
            stat.kind,
            ", ".join(f"{f} {list(a.shape)} {np.dtype(a.dtype)}" for f, a in arrays),
            axes or "-",
            _size(n),
        )
    console = Console()
    console.print(table)
    with_stat = sum(s is not None for s in stats.values())
    console.print(
        f"{len(stats)} leaves, {with_stat} with a statistic, {_size(total)}; "
        "give this directory as a model's `statistics:` in a recipe"
    )


def _size(n: int) -> str:
    """Bytes in binary units.

    Examples:
      >>> _size(3 * 2**20)
      '3.0 MiB'
    """
    value: float = n
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


if __name__ == "__main__":
    main()
