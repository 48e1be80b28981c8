"""The mats-jax command line: merge, inspect, demo, and its errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import blake3
import numpy as np
import pytest
from click.testing import CliRunner

import mats_jax
from mats_jax.cli import main
from mats_jax.io import load_checkpoint, save_checkpoint


@pytest.fixture()
def workdir(tmp_path):
    rng = np.random.default_rng(0)
    tree = {
        "fc": {
            "kernel": rng.normal(size=(3, 4)).astype(np.float32),
            "bias": np.zeros(4, np.float32),
        }
    }
    for name in ("base", "a", "b"):
        save_checkpoint(
            tmp_path / f"{name}.safetensors",
            {
                "fc": {
                    k: v + rng.normal(size=v.shape).astype(np.float32)
                    for k, v in tree["fc"].items()
                }
            },
        )
    (tmp_path / "recipe.yaml").write_text(
        "base: base.safetensors\nmodels: [a.safetensors, b.safetensors]\n"
        "method: task_arithmetic\nparameters: {scale: 0.5}\n"
    )
    return tmp_path


def test_merge_writes_checkpoint_and_card(workdir):
    result = CliRunner().invoke(
        main, ["merge", str(workdir / "recipe.yaml"), "-o", str(workdir / "out")]
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    got = load_checkpoint(workdir / "out")
    base, a, b = (
        load_checkpoint(workdir / f"{n}.safetensors") for n in ("base", "a", "b")
    )
    want = mats_jax.task_arithmetic(base, [a, b], scale=0.5)
    np.testing.assert_array_equal(got["fc"]["kernel"], want["fc"]["kernel"])
    assert (workdir / "out" / "README.md").exists()


@pytest.mark.parametrize(
    ("flags", "column", "digest"),
    [
        ([], "sha256", lambda data: hashlib.sha256(data).hexdigest()),
        (
            ["--checksum", "blake3"],
            "blake3",
            lambda data: blake3.blake3(data).hexdigest(),
        ),
        (["--checksum", "none"], "checksum", lambda data: "not computed"),
        (["--no-checksums"], "checksum", lambda data: "not computed"),
    ],
)
def test_merge_card_records_the_chosen_checksum(workdir, flags, column, digest):
    out = workdir / "out"
    result = CliRunner().invoke(
        main, ["merge", str(workdir / "recipe.yaml"), "-o", str(out), "-q", *flags]
    )
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert f"| input | path | files | bytes | {column} |" in card
    data = (workdir / "a.safetensors").read_bytes()
    assert (
        f"| models[0] | `a.safetensors` | 1 | {len(data)} | `{digest(data)}` |" in card
    )


def test_merge_refuses_an_unknown_checksum(workdir):
    result = CliRunner().invoke(
        main,
        [
            "merge",
            str(workdir / "recipe.yaml"),
            "-o",
            str(workdir / "o"),
            "--checksum",
            "md5",
        ],
    )
    assert result.exit_code == 2
    assert "'md5' is not one of 'sha256', 'blake3', 'none'" in result.output
    assert not (workdir / "o").exists()


def test_merge_refuses_existing_output_unless_overwrite(workdir):
    (workdir / "out").mkdir()
    runner = CliRunner()
    result = runner.invoke(
        main, ["merge", str(workdir / "recipe.yaml"), "-o", str(workdir / "out")]
    )
    assert result.exit_code == 2
    assert "exists; pass --overwrite" in result.output
    result = runner.invoke(
        main,
        [
            "merge",
            str(workdir / "recipe.yaml"),
            "-o",
            str(workdir / "out"),
            "--overwrite",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (workdir / "out" / "model.safetensors").exists()


def test_bad_recipe_exits_2_with_line(workdir):
    (workdir / "bad.yaml").write_text(
        "models: [a.safetensors]\nmethod: average\nsclae: 1\n"
    )
    result = CliRunner().invoke(
        main, ["merge", str(workdir / "bad.yaml"), "-o", str(workdir / "out")]
    )
    assert result.exit_code == 2
    assert "bad.yaml:3: unknown key 'sclae'" in result.output
    assert not (workdir / "out").exists()


def test_merge_without_output_says_what_to_do(workdir):
    result = CliRunner().invoke(main, ["merge", str(workdir / "recipe.yaml")])
    assert result.exit_code == 2
    assert "-o OUT" in result.output


def test_inspect_lists_leaves(workdir):
    result = CliRunner().invoke(main, ["inspect", str(workdir / "a.safetensors")])
    assert result.exit_code == 0, result.output
    assert (
        "fc/kernel" in result.output
        and "[3, 4]" in result.output
        and "float32" in result.output
    )
    assert "2 leaves, 16 parameters" in result.output


def test_inspect_missing_file(workdir):
    result = CliRunner().invoke(main, ["inspect", str(workdir / "nope.msgpack")])
    assert result.exit_code == 2
    assert "nope.msgpack: no such file" in result.output


def test_demo_subcommand_calls_the_demo(monkeypatch):
    from mats_experiment import demo

    seen = []
    monkeypatch.setattr(demo, "main", lambda argv=None: seen.append(argv))
    result = CliRunner().invoke(main, ["demo", "--quick"])
    assert result.exit_code == 0, result.output
    assert seen == [["--quick"]]


def test_demo_bad_input_exits_2_with_the_message():
    # Validated before any data is read or anything trained.
    result = CliRunner().invoke(main, ["demo", "--methods", "no_such_method"])
    assert result.exit_code == 2, result.output
    assert "no_such_method" in result.output
    assert "Traceback" not in result.output


def test_console_script_is_installed(workdir):
    # The entry point from pyproject.toml, run as a user would.
    exe = os.path.join(os.path.dirname(sys.executable), "mats-jax")
    if not os.path.exists(exe):
        pytest.skip("package not installed with its console script")
    out = subprocess.run(
        [exe, "inspect", str(workdir / "b.safetensors")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "fc/bias" in out.stdout


def _merge_in_a_process(workdir, out, **env):
    """``mats-jax merge`` of the workdir's recipe as a user runs it, with ``env``
    over this process's environment (None removes a variable); the bytes written."""
    exe = os.path.join(os.path.dirname(sys.executable), "mats-jax")
    if not os.path.exists(exe):
        pytest.skip("package not installed with its console script")
    environ = {**os.environ, **env}
    proc = subprocess.run(
        [exe, "merge", str(workdir / "recipe.yaml"), "-o", str(workdir / out), "-q"],
        capture_output=True,
        text=True,
        check=False,
        env={k: v for k, v in environ.items() if v is not None},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (workdir / out / "model.safetensors").read_bytes()


def test_compilation_cache_filled_once_and_reused(workdir):
    # Each run is a new process: the second finds every program it compiles
    # in the cache the first wrote (no new entry), and writes the same bytes.
    cache = workdir / "cache"
    first = _merge_in_a_process(workdir, "out1", MATS_JAX_COMPILATION_CACHE=str(cache))
    entries = sorted(os.listdir(cache))
    assert entries
    second = _merge_in_a_process(workdir, "out2", MATS_JAX_COMPILATION_CACHE=str(cache))
    assert sorted(os.listdir(cache)) == entries
    assert first == second


def test_compilation_cache_off_and_default_place(workdir):
    home = workdir / "xdg"
    off = {"MATS_JAX_COMPILATION_CACHE": "off", "XDG_CACHE_HOME": str(home)}
    _merge_in_a_process(workdir, "off", **off)
    assert not home.exists()
    default = {"MATS_JAX_COMPILATION_CACHE": None, "XDG_CACHE_HOME": str(home)}
    _merge_in_a_process(workdir, "on", **default)
    assert os.listdir(home / "mats_jax" / "jax")


def test_terminated_merge_leaves_no_output(workdir, monkeypatch):
    import signal

    from mats_jax.io import safetensors as st

    def terminated(self, name, array):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` would, mid-write

    monkeypatch.setattr(st.SafetensorsWriter, "write", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(
        main, ["merge", str(workdir / "recipe.yaml"), "-o", str(workdir / "out"), "-q"]
    )
    assert result.exit_code == 128 + signal.SIGTERM
    assert sorted(os.listdir(workdir)) == [
        "a.safetensors",
        "b.safetensors",
        "base.safetensors",
        "recipe.yaml",
    ]
    assert signal.getsignal(signal.SIGTERM) is previous
