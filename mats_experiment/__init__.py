"""mats_experiment: an application of mats_jax, end-to-end merging experiments on real data.

It uses mats_jax as any user would, through its public API only (a test holds
it to that): pretrain small Flax models (an MLP, a small ViT), fine-tune one
copy per task, estimate per-task statistics with :func:`mats_jax.kfac` and
friends, merge the shared body with every registered method
(:data:`mats_jax.METHODS`), choosing hyperparameters on validation splits,
and evaluate. Used by the demo (``mats-jax demo``, ``python -m
mats_experiment.demo``) and ``benchmarks/merging.py``.

Modules: :mod:`~mats_experiment.data` (datasets shipped in packages),
:mod:`~mats_experiment.tasks` (task construction and splits),
:mod:`~mats_experiment.models`, :mod:`~mats_experiment.train`,
:mod:`~mats_experiment.methods` (the methods run, their statistics and grids),
:mod:`~mats_experiment.metrics`, :mod:`~mats_experiment.pipeline`,
:mod:`~mats_experiment.report` (tables and plots), :mod:`~mats_experiment.demo`.
"""
