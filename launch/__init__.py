"""Launchers for ``python -m anysat_jax.main``: Cloud TPU pod slices (``launch.tpu_pod``), one
process per GPU host (``launch.gpu_local``) and SLURM clusters (``launch.slurm``). Each has
``--dry-run``, which prints the shell commands it would run and runs nothing."""
