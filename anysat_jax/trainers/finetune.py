"""Fine-tuning, linear probing and evaluation of AnySat on one downstream dataset.

  python -m anysat_jax.main --config=configs/pastis_semseg.py:demo --workdir=runs/pastis_demo

``run(config, workdir, stop)`` prepares the dataset, builds ``DownstreamModel`` (encoder + a
LayerNorm + Linear head), initialises the encoder by ``config.init.kind``, trains with AdamW,
evaluates every ``eval.every_steps`` steps (metrics reset each time), keeps the parameters of
the best evaluation, checkpoints and resumes like the pretraining loop, and at the end writes
``workdir/metrics.json`` (every split of ``eval.splits``) and PNG figures in
``workdir/figures/``. The experiment configs (``configs/<dataset>_<task>.py``) are built with
``base_config`` and ``demo``.

Encoder initialisation (``config.init``):
  scratch    random, from ``model.size``, ``model.overrides`` and ``model.projectors``;
  pretrain   ``path`` = a pretraining workdir: the EMA teacher of its latest (or ``init.step``)
             checkpoint (``optim.teacher_params``), whose shapes must match those ``model``
             settings;
  converted  ``path`` = a converted directory (``python -m anysat_jax.convert``) or an official
             ``.pth`` / ``.npz`` / ``.safetensors`` state dict; the encoder config is read from it.
Only the projectors of ``data.datasets[dataset].modalities`` are kept (spec B.1), and with
``model.date_period`` set, every L-TAE projector uses that period (366 days when fine-tuning).

Training modes (``train_mode``): ``finetune`` trains everything; ``linear_probe`` trains the
head only (``heads.trainable_mask``): the optimiser holds state for the head alone and the
encoder leaves are carried over unchanged, bit for bit.

Schedules (``optim.schedule``; the reference's are per epoch, these are per step):
  warmup_cosine  linear warmup from 0 over the first ``warmup_epochs / epochs`` of the run, then
                 cosine decay to 0 at the last step (LinearWarmupCosineAnnealingLR stepped per
                 epoch: lr 0 during the whole first epoch, then a staircase);
  plateau        constant lr times ``optax.contrib.reduce_on_plateau``: x ``plateau_factor``
                 once more than ``plateau_patience`` epochs did not improve (torch semantics,
                 relative threshold 1e-4); it monitors the mean *training* loss of each epoch,
                 where the reference monitors the validation loss;
  constant       constant lr.
Steps: ``steps_per_epoch`` = floor(training examples / batch) (``drop_last``), ``total_steps`` =
``epochs`` x that, unless set. Evaluation once per epoch unless ``eval.every_steps`` is set.
Early stopping (reference: patience 10 evaluations, not before ``min_epochs``) with
``eval.patience`` > 0. Not done: PLANTED's density sampling, fp16 mixed precision (float32
here), FLAIR's 5-window test-time tiling (the evaluation uses the loader's centred 500-px crop)
and the validation metrics' accumulation across epochs (spec B.5).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils

from anysat_jax import sharding
from anysat_jax.checkpoints import convert
from anysat_jax.core import modalities as mods
from anysat_jax.evaluators import figures, metrics
from anysat_jax.models import heads
from anysat_jax.models.config import EncoderConfig, encoder_config, override
from anysat_jax.models.encoder import AnySatEncoder
from anysat_jax.models.validation import validate_inputs
from anysat_jax.tasks import optim
from anysat_jax.tasks.losses import downstream as ld
from anysat_jax.trainers.pretrain import NonFiniteLossError, checkpoint_manager
from configs.common import add_run_settings
from input_pipeline import builders, loader, prepare
from input_pipeline.dataset_spec import LabelSpec
from input_pipeline.datasets import registry

Params = Any
INIT_KINDS = ("scratch", "pretrain", "converted")
LOSSES = ("bce", "ce", "ce_ignore", "ce_weighted")
SCHEDULES = ("warmup_cosine", "plateau", "constant")
TINY = dict(dim=64, depth=1, num_heads=4, spatial_depth=1, spatial_heads=4)


# ---------------------------------------------------------------------------------------------
# Configs.


def base_config(dataset: str, *, experiment: str, modalities: Sequence[str], patch_size: int,
                loss: str, lr: float, weight_decay: float, batch_size: int, schedule: str,
                eval_splits: Sequence[str], train_mode: str = "finetune",
                dense_modality: str | None = None, proj_size: int = 1, epochs: int = 200,
                **dataset_fields: Any) -> ml_collections.ConfigDict:
  """The config of one paper experiment (spec B.6 / B.7) on the full dataset.

  Args:
    dataset: registry name; the loader's ``default_dataset_config`` gives the rest.
    experiment: the reference's experiment name (``cfg:exp/*``), for the record.
    modalities, patch_size (m), batch_size (global): the experiment's inputs.
    loss: one of ``LOSSES``: ``bce``, ``ce`` (plain softmax CE; one-hot or int labels),
      ``ce_ignore`` (label -1 ignored), ``ce_weighted`` (last class weight 0).
    lr, weight_decay, schedule (``SCHEDULES``), epochs: AdamW and its learning rate.
    eval_splits: evaluated at the end; the first is also the periodic (monitored) one.
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
  c.eval = ml_collections.ConfigDict(dict(
      splits=tuple(eval_splits), every_steps=ml_collections.config_dict.placeholder(int),
      batch_size=ml_collections.config_dict.placeholder(int), select_best=True, patience=10))
  c.figures = ml_collections.ConfigDict(dict(num_tiles=4))

  add_run_settings(c, datasets=(dataset,), checkpoint_keep=2)
  set_dataset(c, modalities=tuple(modalities), batch_size=batch_size, split="train",
               patch_sizes=(patch_size,), manual_dir=None, **dataset_fields)
  _check(c)
  return c


def set_dataset(c: ml_collections.ConfigDict, **fields: Any) -> None:
  """Replaces fields of the dataset's loader config (dropping buckets and crops of modalities
  no longer read)."""
  d = c.data.datasets[c.dataset].to_dict()
  d.update(fields)
  d["buckets"] = {m: t for m, t in d["buckets"].items() if m in d["modalities"]}
  d["crop"] = {m: side for m, side in d["crop"].items() if m in d["modalities"]}
  c.data.datasets = {c.dataset: d}
  if d.get("manual_dir") is None:     # typed, so that --config...manual_dir=DIR can set it
    c.data.datasets[c.dataset].manual_dir = ml_collections.config_dict.placeholder(str)


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
  a tiny random encoder (``TINY``; below dim 64 the L-TAE is degenerate), tiny batches, a few
  steps, reader and prefetch threads 1; the schedule keeps its shape."""
  c.model.size = "tiny"
  c.model.overrides = dict(TINY)
  c.init.kind = "scratch"
  c.total_steps = total_steps
  c.optim.lr = lr
  c.eval.splits = tuple(eval_splits)
  c.eval.every_steps = eval_every
  c.eval.patience = 0
  c.log_every = max(1, total_steps // 10)
  c.checkpoint.every_steps = total_steps
  c.data.read_threads = 1
  c.data.prefetch_batches = 1
  set_dataset(c, batch_size=batch_size, **dataset_fields)
  _check(c)


def _check(c: ml_collections.ConfigDict) -> None:
  if c.train_mode not in heads.TRAINING_MODES:
    raise ValueError(f"train_mode must be one of {heads.TRAINING_MODES}, got {c.train_mode!r}")
  if c.loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}, got {c.loss!r}")
  if c.optim.schedule not in SCHEDULES:
    raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {c.optim.schedule!r}")
  if c.init.kind not in INIT_KINDS:
    raise ValueError(f"init.kind must be one of {INIT_KINDS}, got {c.init.kind!r}")


# ---------------------------------------------------------------------------------------------
# Encoder initialisation.


def _flat_shapes(tree: Params) -> dict[str, tuple[int, ...]]:
  return {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def restore_raw(workdir: str, step: int | None = None) -> tuple[int, dict[str, Any]]:
  """(step, state tree) of a training workdir's checkpoint (latest if ``step`` is None), as
  saved, NamedTuples as dicts, leaves as host NumPy arrays (no target, so any run's state)."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  path = os.path.join(directory, str(step), "state")
  with ocp.PyTreeCheckpointer() as ckptr:
    tree = ckptr.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return step, ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def pretrain_teacher(workdir: str, step: int | None = None) -> Params:
  """The EMA teacher encoder params of a pretraining workdir's checkpoint."""
  _, state = restore_raw(workdir, step)
  fields = set(optim.EmaTeacherState._fields)
  typed = jax.tree.map(
      lambda s: optim.EmaTeacherState(**s) if isinstance(s, dict) and set(s) == fields else s,
      state["opt_state"], is_leaf=lambda s: isinstance(s, dict) and set(s) == fields)
  return optim.teacher_params(typed)


def load_encoder(config: ml_collections.ConfigDict) -> tuple[Params | None, EncoderConfig]:
  """(encoder params or None for ``scratch``, encoder config) per ``config.init``, with the
  projectors of the dataset's modalities only and ``model.date_period`` applied."""
  kind, path = config.init.kind, config.init.path
  modalities = tuple(config.data.datasets[config.dataset].modalities)
  overrides = dict(config.model.overrides)
  for name, fields in config.model.projectors.items():
    overrides.update({f"projectors.{name}.{k}": v for k, v in fields.items()})
  model_cfg = lambda names=None: encoder_config(config.model.size, modalities=names, **overrides)
  if kind == "scratch":
    params, cfg = None, model_cfg(modalities)
  elif not path:
    raise ValueError(f"init.kind={kind!r} needs init.path (set --config.init.path=...)")
  elif kind == "pretrain":
    step = None if config.init.step < 0 else int(config.init.step)
    params, cfg = pretrain_teacher(path, step), model_cfg()
    want, got = _flat_shapes(convert.param_shapes(cfg)), _flat_shapes(params)
    if want != got:
      diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
      raise convert.CheckpointError(
          f"{path}: the teacher does not match model.size={config.model.size!r} with "
          f"overrides {overrides}: {', '.join(diff[:10])}")
  elif os.path.isdir(path):
    params, cfg = convert.load(path)
  else:
    sd = convert.read_state_dict(path)
    cfg = convert.infer_config(sd)
    params = convert.state_dict_to_params(sd, cfg)
  missing = [m for m in modalities if m not in cfg.modality_names]
  if missing:
    raise convert.CheckpointError(f"{path}: no projector for {missing} (it has "
                                  f"{', '.join(cfg.modality_names)})")
  cfg = dataclasses.replace(cfg, projectors=tuple(p for p in cfg.projectors if p[0] in modalities))
  if params is not None:
    dropped = {mods.get(n).param_name for n in mods.MODALITIES if n not in modalities}
    params = {k: v for k, v in params.items() if k not in dropped}
  if config.model.date_period:
    cfg = override(cfg, **{f"projectors.{name}.T": float(config.model.date_period)
                           for name in cfg.modality_names if mods.get(name).projector == "ltae"})
  return params, cfg


# ---------------------------------------------------------------------------------------------
# The experiment: model, loss, metric, optimiser; pure steps.


@flax.struct.dataclass
class TrainState:
  """step: int32 (); params: {"encoder", "head"}; opt_state: the Optax state (head only when
  linear probing)."""

  step: jax.Array
  params: Params
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Steps:
  """Run length in steps: per_epoch, total, eval_every, warmup, min_steps (early stopping)."""

  per_epoch: int
  total: int
  eval_every: int
  warmup: int
  min_steps: int


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What the steps close over (static): model, label spec, metric, optimiser, schedule."""

  model: heads.DownstreamModel
  label: LabelSpec
  loss_name: str
  metric: metrics.Metric
  tx: optax.GradientTransformationExtraArgs
  lr: optax.Schedule
  trainable: Any          # heads.trainable_mask: Python bools shaped like the params
  patch_size: int

  @property
  def dense(self) -> bool:
    return self.model.output == "dense"


def steps_for(config: ml_collections.ConfigDict, num_train: int) -> Steps:
  """Resolves the step counts from the epochs and the training split's size."""
  batch = config.data.datasets[config.dataset].batch_size
  per_epoch = config.steps_per_epoch or max(1, num_train // batch)
  total = config.total_steps or config.epochs * per_epoch
  warmup = math.floor(total * config.optim.warmup_epochs / config.epochs)
  return Steps(per_epoch, total, config.eval.every_steps or per_epoch,
               min(warmup, total - 1), config.min_epochs * per_epoch)


def learning_rate(config: ml_collections.ConfigDict, steps: Steps) -> optax.Schedule:
  """The base learning-rate schedule (``plateau`` scales it inside the optimiser)."""
  o = config.optim
  if o.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, steps.warmup, steps.total, 0.0)
  return optax.constant_schedule(o.lr)


def make_optimizer(config: ml_collections.ConfigDict, steps: Steps,
                   trainable: Any) -> optax.GradientTransformationExtraArgs:
  """AdamW (``torch.optim.AdamW`` semantics) on the trainable leaves, zero updates and no
  state for the others; ``update(..., value=loss)`` feeds ``reduce_on_plateau``."""
  o = config.optim
  adamw = optax.adamw(learning_rate(config, steps), o.b1, o.b2, o.eps,
                      weight_decay=o.weight_decay)
  labels = jax.tree.map(lambda t: "train" if t else "frozen", trainable)
  tx = optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)
  if o.schedule == "plateau":
    # torch reduces once more than `patience` epochs did not improve, optax at `patience`.
    tx = optax.chain(tx, optax.contrib.reduce_on_plateau(
        factor=o.plateau_factor, patience=o.plateau_patience + 1,
        accumulation_size=steps.per_epoch))
  return tx


def make_experiment(config: ml_collections.ConfigDict, enc_cfg: EncoderConfig,
                    steps: Steps) -> Experiment:
  label = registry.get_spec(config.dataset).label
  dense = label.kind == "segmentation"
  if dense and not config.head.dense_modality:
    raise ValueError(f"{config.dataset}: segmentation needs head.dense_modality")
  head = (heads.DenseHead(label.num_classes, config.head.proj_size) if dense
          else heads.ClassificationHead(label.num_classes))
  model = heads.DownstreamModel(AnySatEncoder(enc_cfg), head, "dense" if dense else "tile",
                                config.head.dense_modality if dense else None)
  shapes = {"encoder": convert.param_shapes(enc_cfg), "head": _head_shapes(model)}
  trainable = heads.trainable_mask(shapes, config.train_mode)
  patch_sizes = tuple(config.data.datasets[config.dataset].patch_sizes)
  if len(patch_sizes) != 1:
    raise ValueError(f"fine-tuning uses one patch size, got patch_sizes={patch_sizes}")
  return Experiment(model, label, config.loss, metrics.metric_for(config.dataset),
                    make_optimizer(config, steps, trainable), learning_rate(config, steps),
                    trainable, int(patch_sizes[0]))


def _head_input(model: heads.DownstreamModel) -> jax.ShapeDtypeStruct:
  width = model.encoder.config.dim
  shape = (1, 1, 1, 2 * width) if model.output == "dense" else (1, width)
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _head_shapes(model: heads.DownstreamModel) -> Params:
  return jax.eval_shape(model.head.init, jax.random.key(0), _head_input(model))["params"]


def init_state(exp: Experiment, encoder_params: Params | None, seed: int) -> TrainState:
  """Step 0: the given (or random) encoder params, a random head, fresh optimiser state.
  Traceable (``jax.eval_shape`` / ``jax.jit``)."""
  k_enc, k_head = jax.random.split(jax.random.key(seed, impl="rbg"))
  if encoder_params is None:
    encoder_params = exp.model.encoder.init(k_enc, method=AnySatEncoder.init_all)["params"]
  x = jnp.zeros(_head_input(exp.model).shape, jnp.float32)
  params = {"encoder": encoder_params, "head": exp.model.head.init(k_head, x)["params"]}
  return TrainState(jnp.zeros((), jnp.int32), params, exp.tx.init(params))


def task_loss(name: str, label: LabelSpec, logits: jax.Array, labels: jax.Array,
              mask: jax.Array | None = None) -> jax.Array:
  """Scalar float32 loss of one batch (``LOSSES``).

  Args:
    logits: (B, K) or (B, H, W, K).
    labels: multi-hot or one-hot float (B, K), or int (B,) / (B, H, W).
    mask: (B,) ``example_mask`` or None.
  """
  if name == "bce":
    return ld.bce_loss(logits, labels, mask)
  if labels.ndim == logits.ndim:      # one-hot targets
    return ld.cross_entropy_onehot(logits, labels, mask)
  if name == "ce":
    return ld.cross_entropy(logits, labels, mask=mask)
  if name == "ce_ignore":
    return ld.cross_entropy(logits, labels, ignore_index=-1, mask=mask)
  return ld.cross_entropy(logits, labels, mask=mask,
                          class_weights=ld.last_class_void_weights(label.num_classes))


def _logits(exp: Experiment, params: Params, batch: Mapping[str, jax.Array]) -> jax.Array:
  logits = exp.model.apply({"params": params}, loader.model_inputs(batch), exp.patch_size)
  if exp.dense:
    logits = heads.resize_logits(logits, batch["label"].shape[1:3])
  return logits


def train_step(state: TrainState, batch: dict[str, jax.Array], *,
               exp: Experiment) -> tuple[TrainState, dict[str, jax.Array]]:
  """One AdamW step on a batch (model inputs and ``label``); frozen leaves are carried over
  unchanged and get no gradient. Metrics: ``loss``, ``lr``, ``finite``."""
  def loss_fn(params):
    params = jax.tree.map(lambda t, p: p if t else jax.lax.stop_gradient(p), exp.trainable,
                          params)
    return task_loss(exp.loss_name, exp.label, _logits(exp, params, batch), batch["label"])

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  updates, opt_state = exp.tx.update(grads, state.opt_state, state.params, value=loss)
  new = optax.apply_updates(state.params, updates)
  params = jax.tree.map(lambda t, n, o: n if t else o, exp.trainable, new, state.params)
  metrics_ = dict(loss=loss, finite=jnp.isfinite(loss),
                  lr=exp.lr(state.step) * plateau_scale(opt_state))
  return TrainState(state.step + 1, params, opt_state), metrics_


def plateau_scale(opt_state: Any) -> jax.Array | float:
  """The learning-rate factor of ``reduce_on_plateau`` in ``opt_state`` (1 without it)."""
  plateau = optax.contrib.ReduceLROnPlateauState
  found = [s.scale for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, plateau))
           if isinstance(s, plateau)]
  return found[0] if found else 1.0


def eval_step(metric_state: metrics.Counts, params: Params, batch: dict[str, jax.Array], *,
              exp: Experiment) -> tuple[metrics.Counts, jax.Array, jax.Array]:
  """Accumulates one evaluation batch (with ``example_mask``): (metric state, batch loss over
  the real rows, argmax predictions (B,) or (B, H, W))."""
  logits = _logits(exp, params, batch)
  mask = batch["example_mask"]
  loss = task_loss(exp.loss_name, exp.label, logits, batch["label"], mask)
  return (exp.metric.update(metric_state, logits, batch["label"], mask), loss,
          jnp.argmax(logits, -1))


# ---------------------------------------------------------------------------------------------
# Host side: data, evaluation, outputs.


def _split_config(config: ml_collections.ConfigDict, split: str,
                  batch_size: int | None = None) -> ml_collections.ConfigDict:
  data = config.data.copy_and_resolve_references()
  d = data.datasets[config.dataset]
  d.split = split
  d.batch_size = batch_size or d.batch_size
  return data


def _num_examples(config: ml_collections.ConfigDict, split: str) -> int:
  d = config.data.datasets[config.dataset]
  built = loader.prepared_name(config.dataset, tuple(d.modalities), config.data.data_dir)
  return len(builders.data_sources(built, config.data.data_dir)[split])


def _device_batch(batch: Mapping[str, np.ndarray], bsharding: Any) -> dict[str, jax.Array]:
  return sharding.global_batch({k: v for k, v in batch.items() if k != "name"}, bsharding)


def _rgb_bands(modality: str) -> tuple[int, int, int]:
  """Red, green, blue channel indices of a modality (false colour from its first channels)."""
  bands = mods.get(modality).bands
  for trio in (("B4", "B3", "B2"), ("R", "G", "B")):
    if all(b in bands for b in trio):
      return tuple(bands.index(b) for b in trio)
  return tuple(i % len(bands) for i in range(3))


class Evaluator:
  """Evaluates params on a split: one pass, fresh metric state, compiled once per signature."""

  def __init__(self, config: ml_collections.ConfigDict, exp: Experiment, bsharding: Any,
               enc_cfg: EncoderConfig):
    self._config, self._exp, self._bsharding, self._enc_cfg = config, exp, bsharding, enc_cfg
    self._step = jax.jit(lambda m, p, b: eval_step(m, p, b, exp=exp))
    self._validated: set = set()

  def __call__(self, params: Params, split: str, num_tiles: int = 0
               ) -> tuple[dict[str, Any], metrics.Counts, list[dict[str, np.ndarray]]]:
    """(results incl. ``loss``, metric state, up to ``num_tiles`` host examples with
    ``pred``)."""
    config, exp = self._config, self._exp
    data = _split_config(config, split, config.eval.batch_size)
    state, loss_sum, count, tiles = exp.metric.init(), 0.0, 0.0, []
    for batch in loader.dataset_pipeline(data, config.dataset, training=False):
      signature = tuple((k, v.shape) for k, v in batch.items())
      if signature not in self._validated:
        validate_inputs(loader.model_inputs(batch), exp.patch_size, self._enc_cfg,
                        exp.model.output, exp.model.dense_modality)
        self._validated.add(signature)
      state, loss, pred = self._step(state, params, _device_batch(batch, self._bsharding))
      n = float(batch["example_mask"].sum())
      loss_sum, count = loss_sum + float(loss) * n, count + n
      if len(tiles) < num_tiles:
        pred = np.asarray(multihost_utils.process_allgather(pred, tiled=True))
        for i in np.flatnonzero(batch["example_mask"])[:num_tiles - len(tiles)]:
          tiles.append({**{k: v[i] for k, v in batch.items()}, "pred": pred[i]})
    results = exp.metric.compute(state)
    results["loss"] = loss_sum / max(count, 1.0)
    return results, state, tiles


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (np.ndarray, list, tuple)):
    return [_jsonable(v) for v in np.asarray(x).tolist()]
  if isinstance(x, (float, np.floating)):
    return None if not math.isfinite(x) else float(x)
  if isinstance(x, np.integer):
    return int(x)
  return x


def write_figures(directory: str, split: str, dataset: str, exp: Experiment,
                  state: metrics.Counts, tiles: Sequence[dict[str, np.ndarray]]) -> list[str]:
  """Confusion matrix (multiclass, segmentation) and input / prediction / truth panels
  (segmentation) of a split; returns the paths written."""
  os.makedirs(directory, exist_ok=True)
  label = exp.label
  k = label.num_classes
  names = label.class_names or tuple(str(i) for i in range(k))
  written = []
  if label.kind != "multilabel":
    path = os.path.join(directory, f"{split}_confusion.png")
    figures.save_confusion_matrix(path, metrics.value(state).reshape(k, k), names)
    written.append(path)
  if exp.dense:
    m = exp.model.dense_modality
    for i, tile in enumerate(tiles):
      x = tile[m][0] if mods.get(m).temporal else tile[m]
      path = os.path.join(directory, f"{split}_tile{i}_{tile['name']}.png")
      figures.save_segmentation_panel(path, figures.rgb_from_bands(x, _rgb_bands(m)),
                                      tile["pred"], tile["label"], names,
                                      figures.COLORMAPS[dataset],
                                      label.ignore_index)
      written.append(path)
  return written


def _scalars(prefix: str, results: Mapping[str, Any]) -> dict[str, float]:
  return {f"{prefix}/{k}": float(v) for k, v in results.items() if np.ndim(v) == 0}


# ---------------------------------------------------------------------------------------------
# The loop.


def run(config: ml_collections.ConfigDict, workdir: str, stop: dict[str, bool]) -> None:
  """Fine-tunes (or linear-probes) and evaluates; resumes from ``workdir/checkpoints``."""
  from clu import metric_writers, periodic_actions

  os.makedirs(workdir, exist_ok=True)
  _check(config)
  name, d = config.dataset, config.data.datasets[config.dataset]
  prepare.ensure_prepared(name, config.data.data_dir, modalities=tuple(d.modalities),
                          manual_dir=d.get("manual_dir"))
  steps = steps_for(config, _num_examples(config, d.split))
  encoder_params, enc_cfg = load_encoder(config)
  exp = make_experiment(config, enc_cfg, steps)
  mesh = sharding.make_mesh(config)
  bsharding = sharding.batch_sharding(mesh)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  logging.info("%s (%s, %s): %d steps, %d per epoch, eval every %d", config.experiment, name,
               config.train_mode, steps.total, steps.per_epoch, steps.eval_every)

  init = lambda enc: init_state(exp, enc, config.seed)
  state_sharding = sharding.tree_sharding(jax.eval_shape(init, encoder_params), mesh,
                                          config.mesh.fsdp_min_size)
  state = jax.jit(init, out_shardings=state_sharding)(encoder_params)
  del encoder_params
  train_iter = iter(loader.dataset_pipeline(config.data, name, training=True))
  manager = checkpoint_manager(workdir, config)
  best = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "best"),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: m["monitor"],
                                           best_mode="max", create=True))
  if manager.latest_step() is not None:
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          state, state_sharding)
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    state = restored.state
    train_iter.set_state(restored.data)
    print(f"resumed from checkpoint at step {manager.latest_step()}", flush=True)

  step_fn = jax.jit(lambda s, b: train_step(s, b, exp=exp), donate_argnums=(0,),
                    out_shardings=(state_sharding, None))
  evaluate = Evaluator(config, exp, bsharding, enc_cfg)
  report = periodic_actions.ReportProgress(num_train_steps=steps.total, writer=writer,
                                           every_steps=config.log_every)
  monitor_split = config.eval.splits[0]
  step = int(jax.device_get(state.step))
  validated: set = set()
  losses: list[float] = []
  early = False

  def save(step: int) -> None:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               data=ocp.args.JsonSave(train_iter.get_state())))

  with jax.set_mesh(mesh):
    while step < steps.total:
      batch = next(train_iter)
      signature = tuple((k, v.shape) for k, v in batch.items())
      if signature not in validated:          # once per batch signature, before compiling
        validate_inputs(loader.model_inputs(batch), exp.patch_size, enc_cfg, exp.model.output,
                        exp.model.dense_modality)
        validated.add(signature)
      state, m = step_fn(state, _device_batch(batch, bsharding))
      m = jax.device_get(m)
      if not bool(m["finite"]):
        manager.wait_until_finished()
        raise NonFiniteLossError(f"non-finite loss at step {step}: {m['loss']}; last good "
                                 f"checkpoint: step {manager.latest_step()}")
      step += 1
      losses.append(float(m["loss"]))
      report(step)
      if step % config.log_every == 0 or step == steps.total:
        writer.write_scalars(step, {"train/loss": float(np.mean(losses)), "lr": float(m["lr"])})
        losses.clear()
      if step % steps.eval_every == 0 or step == steps.total:
        results, _, _ = evaluate(state.params, monitor_split)
        writer.write_scalars(step, _scalars(monitor_split, results))
        value = float(results[exp.metric.monitor])
        best.save(step, args=ocp.args.StandardSave(state.params),
                  metrics={"monitor": value if math.isfinite(value) else -math.inf})
        best.wait_until_finished()
        if config.eval.patience > 0 and step >= steps.min_steps \
            and step - best.best_step() >= config.eval.patience * steps.eval_every:
          print(f"early stopping at step {step}: best {exp.metric.monitor} at step "
                f"{best.best_step()}", flush=True)
          early = True
      if stop["requested"] or early or step % config.checkpoint.every_steps == 0 \
          or step == steps.total:
        save(step)
      if stop["requested"]:
        manager.wait_until_finished()
        print(f"stopped by signal at step {step}; checkpoint saved", flush=True)
        return
      if early:
        break
    manager.wait_until_finished()
    params, evaluated = state.params, step
    if config.eval.select_best and best.best_step() is not None:
      evaluated = best.best_step()
      target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            state.params)
      params = best.restore(evaluated, args=ocp.args.StandardRestore(target))
    finish(config, workdir, exp, evaluate, params, step, evaluated)
  writer.flush()


def finish(config: ml_collections.ConfigDict, workdir: str, exp: Experiment,
           evaluate: Evaluator, params: Params, step: int, evaluated: int) -> None:
  """Evaluates ``params`` on every split and writes metrics.json and the figures."""
  out: dict[str, Any] = dict(experiment=config.experiment, dataset=config.dataset,
                             train_mode=config.train_mode, monitor=exp.metric.monitor,
                             metric=exp.metric.name, step=step, evaluated_step=evaluated,
                             splits={})
  for split in config.eval.splits:
    results, state, tiles = evaluate(params, split, config.figures.num_tiles if exp.dense else 0)
    out["splits"][split] = results
    print(f"{split}: " + ", ".join(f"{k}={v:.4f}" for k, v in _scalars(split, results).items()),
          flush=True)
    if jax.process_index() == 0:
      write_figures(os.path.join(workdir, "figures"), split, config.dataset, exp, state, tiles)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(_jsonable(out), f, indent=1)

