"""Learning-rate schedules (per optimiser step) and the step counts of a fine-tuning run.

Pretraining (``optim.schedule``): ``constant``, or ``warmup_cosine`` (linear warmup over
``optim.warmup_steps``, cosine decay to 0 at ``total_steps``).

Fine-tuning (the reference's are per epoch, these are per step):
  warmup_cosine  linear warmup from 0 over the first ``warmup_epochs / epochs`` of the run, then
                 cosine decay to 0 at the last step (LinearWarmupCosineAnnealingLR stepped per
                 epoch: lr 0 during the whole first epoch, then a staircase);
  plateau        constant lr times ``optax.contrib.reduce_on_plateau`` (in the optimiser, see
                 ``optim.finetune_optimizer``; ``plateau_scale`` reads its factor);
  constant       constant lr.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import ml_collections
import optax

from anysat_jax.core import options


@dataclasses.dataclass(frozen=True)
class Steps:
  """Run length of a fine-tuning run in steps: per_epoch, total, eval_every, warmup, min_steps
  (early stopping)."""

  per_epoch: int
  total: int
  eval_every: int
  warmup: int
  min_steps: int


def steps_for(config: ml_collections.ConfigDict, num_train: int,
              eval_every: int | None = None) -> Steps:
  """Resolves the step counts from the epochs and the training split's size: ``per_epoch`` =
  floor(examples / batch) (``drop_last``), ``total`` = ``epochs`` x that, unless set;
  ``eval_every`` (the monitored evaluation's period) defaults to once per epoch."""
  batch = config.data.datasets[config.dataset].batch_size
  per_epoch = config.steps_per_epoch or max(1, num_train // batch)
  total = config.total_steps or config.epochs * per_epoch
  warmup = math.floor(total * config.optim.warmup_epochs / config.epochs)
  return Steps(per_epoch, total, eval_every or per_epoch,
               min(warmup, total - 1), config.min_epochs * per_epoch)


def pretrain_lr(config: ml_collections.ConfigDict) -> optax.Schedule:
  o = config.optim
  options.check("optim.schedule", o.schedule, options.PRETRAIN_SCHEDULES)
  if o.schedule == "constant":
    return optax.constant_schedule(o.lr)
  return optax.warmup_cosine_decay_schedule(0.0, o.lr, o.warmup_steps, config.total_steps)


def finetune_lr(config: ml_collections.ConfigDict, steps: Steps) -> optax.Schedule:
  """The base schedule (``plateau`` scales it inside the optimiser)."""
  o = config.optim
  options.check("optim.schedule", o.schedule, options.FINETUNE_SCHEDULES)
  if o.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, steps.warmup, steps.total, 0.0)
  return optax.constant_schedule(o.lr)


def plateau_scale(opt_state: Any) -> jax.Array | float:
  """The learning-rate factor of ``reduce_on_plateau`` in ``opt_state`` (1 without it)."""
  plateau = optax.contrib.ReduceLROnPlateauState
  found = [s.scale for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, plateau))
           if isinstance(s, plateau)]
  return found[0] if found else 1.0
