"""The settings every job's config holds, whatever its task: the device mesh, the multi-process
set-up, checkpointing and data reading. ``configs/geoplex.py`` and ``finetune.base_config`` build
on ``add_run_settings``; the trainers and ``sharding`` read these keys."""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from input_pipeline.loader import default_dataset_config


def add_run_settings(c: ml_collections.ConfigDict, *, datasets: Sequence[str],
                     checkpoint_keep: int) -> None:
  """Sets ``c.mesh``, ``c.distributed``, ``c.checkpoint`` and ``c.data`` (the loader's defaults
  for each of ``datasets``; ``data.seed`` follows ``c.seed``, which must exist)."""
  c.mesh = dict(data=-1, fsdp=1, fsdp_min_size=2**20)
  c.distributed = dict(coordinator_address="", num_processes=1, process_id=0,
                       cpu_collectives="")
  c.checkpoint = dict(every_steps=1000, keep=checkpoint_keep, use_async=True)

  c.data = ml_collections.ConfigDict()
  c.data.data_dir = "data/tfds"
  c.data.seed = c.get_ref("seed")
  c.data.skip_bad = False
  c.data.read_threads = 4
  c.data.prefetch_batches = 2
  c.data.datasets = {name: default_dataset_config(name) for name in datasets}
