"""What the experiment configs share: the run settings every job holds (device mesh,
multi-process set-up, checkpointing, data reading), the tiny model of the demos, and the
builders of the fine-tuning configs (``base_config``, ``set_dataset``, ``parse_variant``,
``demo``). Configs import no training code: only this module, ``ml_collections``,
``anysat_jax.core`` and the input pipeline's per-dataset defaults."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections

from anysat_jax.core import options

# EncoderConfig overrides of the demos' tiny model (below dim 64 the L-TAE is degenerate).
TINY = dict(dim=64, depth=1, num_heads=4, spatial_depth=1, spatial_heads=4)


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


# ---------------------------------------------------------------------------------------------
# Fine-tuning experiments (``configs/<dataset>_<task>.py``).


def base_config(dataset: str, *, experiment: str, modalities: Sequence[str], patch_size: int,
                loss: str, lr: float, weight_decay: float, batch_size: int, schedule: str,
                eval_splits: Sequence[str], train_mode: str = "finetune", eval_type: str = "",
                dense_modality: str | None = None, proj_size: int = 1, epochs: int = 200,
                **dataset_fields: Any) -> ml_collections.ConfigDict:
  """The config of one paper experiment (spec B.6 / B.7) on the full dataset.

  Args:
    dataset: registry name; the loader's ``default_dataset_config`` gives the rest.
    experiment: the reference's experiment name (``cfg:exp/*``), for the record.
    modalities, patch_size (m), batch_size (global): the experiment's inputs.
    loss: one of ``options.LOSSES``: ``bce``, ``ce`` (plain softmax CE; one-hot or int labels),
      ``ce_ignore`` (label -1 ignored), ``ce_weighted`` (last class weight 0).
    lr, weight_decay, schedule (``options.FINETUNE_SCHEDULES``), epochs: AdamW and its
      learning rate.
    eval_splits, eval_type: ``evals`` (``set_evals``) of that type (``options.EVALUATORS``;
      default: segmentation with a dense head, else classification).
    train_mode: ``finetune`` or ``linear_probe``.
    dense_modality, proj_size: segmentation head (``DenseHead``); None = tile classification.
    dataset_fields: loader settings of the dataset (e.g. ``temporal_dropout``, ``crop``).
  """
  c = ml_collections.ConfigDict()
  c.task = "finetune"
  c.experiment = experiment
  c.dataset = dataset
  c.train_mode = train_mode
  c.seed = 32
  c.epochs = epochs
  c.min_epochs = 50
  c.steps_per_epoch = ml_collections.config_dict.placeholder(int)   # None: from the split size
  c.total_steps = ml_collections.config_dict.placeholder(int)       # None: epochs x the above
  c.log_every = 50

  c.model = ml_collections.ConfigDict()
  c.model.size = "base"
  c.model.overrides = {}          # EncoderConfig fields, e.g. dim=64
  c.model.projectors = {}         # per modality, e.g. {"s2": {"mlp_in": (32, 32, 64, 128, 64)}}
  c.model.date_period = 366.0       # L-TAE period of the fine-tuning configs (spec B.1)
  c.init = ml_collections.ConfigDict(dict(kind="converted", path="", step=-1))  # -1: latest
  c.head = ml_collections.ConfigDict(dict(dense_modality=dense_modality or "",
                                          proj_size=proj_size))
  c.loss = loss
  c.optim = ml_collections.ConfigDict(dict(
      lr=lr, weight_decay=weight_decay, b1=0.9, b2=0.999, eps=1e-8, schedule=schedule,
      warmup_epochs=20, plateau_factor=0.1, plateau_patience=10))
  # The evaluation that selects the best step and early-stops, and its batch size.
  c.eval = ml_collections.ConfigDict(dict(
      monitor="", batch_size=ml_collections.config_dict.placeholder(int), select_best=True,
      patience=10))
  c.evals = {}
  set_evals(c, eval_splits, every_steps=None,
            type=eval_type or ("segmentation" if dense_modality else "classification"))

  add_run_settings(c, datasets=(dataset,), checkpoint_keep=2)
  set_dataset(c, modalities=tuple(modalities), batch_size=batch_size, split="train",
               patch_sizes=(patch_size,), manual_dir=None, **dataset_fields)
  check_finetune(c)
  return c


def set_dataset(c: ml_collections.ConfigDict, **fields: Any) -> None:
  """Replaces fields of the dataset's loader config (dropping buckets and crops of modalities
  no longer read)."""
  d = c.data.datasets[c.dataset].to_dict()
  d.update(fields)
  if fields.get("batch_size") is not None:   # fine-tuning batches are global
    d["per_device_batch"] = None
  d["buckets"] = {m: t for m, t in d["buckets"].items() if m in d["modalities"]}
  d["crop"] = {m: side for m, side in d["crop"].items() if m in d["modalities"]}
  c.data.datasets = {c.dataset: d}
  if d.get("manual_dir") is None:     # typed, so that --config...manual_dir=DIR can set it
    c.data.datasets[c.dataset].manual_dir = ml_collections.config_dict.placeholder(str)


def set_evals(c: ml_collections.ConfigDict, splits: Sequence[str], every_steps: int | None,
              type: str = "", num_figures: int = 4) -> None:  # noqa: A002
  """Declares one evaluation per split, named after it (``type`` default: the current one):
  the first is the monitored one (``eval.monitor``), run every ``every_steps`` (None: once per
  epoch); the others run at the end only (``every_steps=0``). Every evaluation runs at the
  end on the selected parameters and goes to ``metrics.json``."""
  type = type or next(iter(c.evals.values())).type    # noqa: A001
  c.evals = {split: dict(type=type, split=split, num_figures=num_figures,
                         every_steps=ml_collections.config_dict.placeholder(int) if i == 0
                         else 0) for i, split in enumerate(splits)}
  if every_steps is not None:
    c.evals[splits[0]].every_steps = every_steps
  c.eval.monitor = splits[0]


def parse_variant(arg: str | None, *, has_finetune: bool = True,
                  has_linear_probe: bool = False) -> tuple[str, bool]:
  """(train mode, demo) of a config argument: "", "demo", "lp", "lp_demo".

  Without ``has_finetune`` (Sen1Floods11) the default mode is linear probing.
  """
  known = ["", "demo"] + (["lp", "lp_demo"] if has_linear_probe and has_finetune else [])
  if (arg or "") not in known:
    raise ValueError(f"unknown variant {arg!r} (known: {', '.join(repr(k) for k in known)})")
  lp = (arg or "").startswith("lp") or not has_finetune
  return ("linear_probe" if lp else "finetune"), (arg or "").endswith("demo")


def demo(c: ml_collections.ConfigDict, *, total_steps: int, batch_size: int, lr: float,
         eval_splits: Sequence[str], eval_every: int, **dataset_fields: Any) -> None:
  """Turns a paper config into its demo: the shipped / generated samples (``ensure_prepared``),
  a tiny random encoder (``TINY``), tiny batches, a few
  steps, reader and prefetch threads 1; the schedule keeps its shape."""
  c.model.size = "tiny"
  c.model.overrides = dict(TINY)
  c.init.kind = "scratch"
  c.total_steps = total_steps
  c.optim.lr = lr
  set_evals(c, eval_splits, every_steps=eval_every)
  c.eval.patience = 0
  c.log_every = max(1, total_steps // 10)
  c.checkpoint.every_steps = total_steps
  c.data.read_threads = 1
  c.data.prefetch_batches = 1
  set_dataset(c, batch_size=batch_size, **dataset_fields)
  check_finetune(c)


def check_finetune(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key whose value is not one of the known options."""
  options.check("train_mode", c.train_mode, options.TRAIN_MODES)
  options.check("loss", c.loss, options.LOSSES)
  options.check("optim.schedule", c.optim.schedule, options.FINETUNE_SCHEDULES)
  options.check("init.kind", c.init.kind, options.INIT_KINDS)
  for name, spec in c.evals.items():
    options.check(f"evals.{name}.type", spec.type, options.EVALUATORS)
  options.check("eval.monitor", c.eval.monitor, tuple(c.evals))
