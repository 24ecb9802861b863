"""The settings every job's config holds, whatever its task: the device mesh, the multi-process
set-up, checkpointing and data reading. ``configs/geoplex.py`` and ``finetune.base_config`` build
on ``add_run_settings``; the trainers and ``sharding`` read these keys."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections


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


# Datasets: the official settings of each (fields: ``input_pipeline.loader``'s docstring).
# GeoPlex (spec A.3, C.12): modalities in the official order, the paper's per-device batch sizes,
# patch sizes and sampling weights.
GEOPLEX = ("treesatai_ts", "pastis_hd", "flair", "planted", "s2naip_urban")
_DATASETS: dict[str, dict[str, Any]] = {
    "treesatai_ts": dict(modalities=("aerial", "s2", "s1-asc"), per_device_batch=128,
                         patch_sizes=(10, 20), weight=1.0, buckets={"s2": 160, "s1-asc": 64},
                         crop={"aerial": 300}),
    "pastis_hd": dict(modalities=("spot", "s2", "s1"), per_device_batch=1,
                      patch_sizes=(40, 80, 160), weight=1.0, buckets={"s2": 20, "s1": 20},
                      max_dates=20),
    "flair": dict(modalities=("aerial-flair", "s2"), per_device_batch=32, patch_sizes=(10, 20),
                  weight=1.0, buckets={"s2": 120}, crop={"aerial-flair": 500}),
    "planted": dict(modalities=("s2", "s1", "l7", "alos", "modis"), per_device_batch=256,
                    patch_sizes=(30,), weight=2.0,
                    buckets={"s2": 8, "s1": 8, "l7": 20, "alos": 4, "modis": 60}),
    "s2naip_urban": dict(modalities=("naip", "l8", "s2", "s1"), per_device_batch=2,
                         patch_sizes=(40, 80, 160), weight=4.0,
                         buckets={"l8": 4, "s2": 32, "s1": 8}),
    # Downstream datasets: fine-tuning global batch sizes, patch sizes and dropouts (spec B.7, C.1).
    "pastis_hd_cls": dict(modalities=("spot", "s2", "s1"), batch_size=4, patch_sizes=(40,),
                          buckets={"s2": 20, "s1": 20}, max_dates=20),
    "sen1floods11": dict(modalities=("s2", "s1"), batch_size=4, patch_sizes=(80,),
                         buckets={"s2": 1, "s1": 1}),
    "bradd_s1ts": dict(modalities=("s1",), batch_size=8, patch_sizes=(40,), buckets={"s1": 66},
                       temporal_dropout=0.5),
    "sickle": dict(modalities=("s2", "s1", "l8"), batch_size=12, patch_sizes=(10,),
                   buckets={"s2": 64, "s1": 64, "l8": 32}, temporal_dropout=0.2),
    "timesen2crop": dict(modalities=("s2",), batch_size=2048, patch_sizes=(10,),
                         buckets={"s2": 40}, temporal_dropout=0.3),
}


def default_dataset_config(name: str) -> ml_collections.ConfigDict:
  """The official settings of dataset ``name``.

  GeoPlex datasets (``GEOPLEX``): modalities, per-device batch sizes, patch sizes and weights of
  the original pretraining, no temporal dropout except PASTIS's 20 dates, crops of TreeSatAI
  ``aerial`` (300 px) and FLAIR ``aerial-flair`` (500 px). Others: their fine-tuning settings
  (spec B.7, C.1), global batch sizes. Bucket lengths: the longest series the spec reports
  (C.3-C.12; FLAIR s2 114 rounded up to 120; PASTIS 20 = its count-style dropout, so longer
  evaluation series are sub-sampled to 20), and our choices where it gives none: TreeSatAI s2
  160 / s1-asc 64 (the demo tile has 146 / 60 dates), SICKLE 64 / 64 / 32, TimeSen2Crop 40
  (paper: 29).
  """
  if name not in _DATASETS:
    raise ValueError(f"no default configuration for {name!r}; known: {', '.join(_DATASETS)}")
  unset = ml_collections.config_dict.placeholder           # An int field, None until set.
  d = dict(split="train", weight=1.0, crop={}, temporal_dropout=0.0, max_dates=unset(int),
           batch_size=unset(int), per_device_batch=unset(int))
  d.update(_DATASETS[name])
  return ml_collections.ConfigDict(d)
