"""End-to-end merging experiments on real data shipped inside packages.

Pretrain small Flax models (an MLP, a small ViT), fine-tune one copy per task,
estimate per-task statistics with :mod:`mats_jax.stats`, merge the shared body
with every method and evaluate: used by ``python -m mats_jax.demo`` and
``benchmarks/merging.py``. Modules: :mod:`~mats_jax.experiment.data` (datasets),
:mod:`~mats_jax.experiment.tasks` (task construction and splits),
:mod:`~mats_jax.experiment.models`, :mod:`~mats_jax.experiment.train`,
:mod:`~mats_jax.experiment.methods` (methods and their grids),
:mod:`~mats_jax.experiment.metrics`, :mod:`~mats_jax.experiment.pipeline`,
:mod:`~mats_jax.experiment.report` (tables and plots).
"""
