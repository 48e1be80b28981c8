"""The merge engines, one per execution mode; they run any method and name none.

- :mod:`~mats_jax.engine.memory`: parameter pytrees in memory, jitted, on one
  device or sharded over a mesh;
- :mod:`~mats_jax.engine.stream`: checkpoints on disk, one leaf at a time.
"""
